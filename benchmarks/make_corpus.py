"""Writes benchmarks/corpus.jsonl: a fixed mix of short queries and long passages.

The corpus is committed; this script documents how it was made (fixed seed), so it
can be regenerated identically. Sentences in six languages are combined into 160
queries of a few words and 160 passages of 3 to 40 sentences.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SENTENCES = {
    "en": [
        "The committee approved the new budget after a long debate.",
        "Hybrid retrieval combines lexical matching with dense vector search.",
        "A cat sleeps on the warm windowsill while the rain falls outside.",
        "Interest rates rose for the third time this year, worrying investors.",
        "The library extended its opening hours during the exam period.",
        "Engineers replaced the bridge's bearings without closing the road.",
        "Memory limits in containers are enforced by the kernel's cgroup controller.",
        "She planted tomatoes, basil and peppers in the community garden.",
        "The orchestra rehearsed the symphony's final movement twice.",
        "Researchers measured how quickly the glacier retreated over a decade.",
    ],
    "fr": [
        "Le conseil municipal a voté la rénovation de la place centrale.",
        "Les chercheurs ont publié leurs résultats dans une revue internationale.",
        "Le train de nuit relie désormais Paris à Vienne trois fois par semaine.",
        "La boulangerie du quartier ouvre dès six heures du matin.",
        "Un chat dort paisiblement sur le canapé du salon.",
    ],
    "de": [
        "Die Stadtverwaltung plant neue Radwege entlang des Flusses.",
        "Das Unternehmen meldete für das dritte Quartal einen Gewinnanstieg.",
        "Im Winter sinken die Temperaturen in den Alpen oft unter null Grad.",
        "Die Ausstellung zeigt Werke von Künstlerinnen des zwanzigsten Jahrhunderts.",
    ],
    "es": [
        "El mercado de valores cayó bruscamente tras el anuncio del banco central.",
        "La biblioteca municipal organiza talleres de lectura para niños.",
        "Los científicos descubrieron una nueva especie de rana en la selva.",
        "El festival de cine atrajo a miles de visitantes este verano.",
    ],
    "zh": [
        "研究人员发现了一种新的蛋白质结构。",
        "这座城市计划在明年开通两条新的地铁线路。",
        "图书馆在考试期间延长了开放时间。",
    ],
    "ru": [
        "Учёные опубликовали результаты многолетнего исследования климата.",
        "Новый мост через реку откроют в следующем месяце.",
        "Библиотека продлила часы работы на время экзаменов.",
    ],
}
QUERY_WORDS = [
    "how",
    "to",
    "what",
    "is",
    "hybrid",
    "search",
    "cat",
    "budget",
    "interest",
    "rates",
    "bridge",
    "glacier",
    "memory",
    "limit",
    "container",
    "garden",
    "symphony",
    "train",
    "Paris",
    "Vienne",
    "Radwege",
    "mercado",
    "biblioteca",
    "地铁",
    "климат",
    "rain",
]


def main() -> None:
    rng = random.Random(20261127)
    all_sentences = [s for group in SENTENCES.values() for s in group]
    rows = []
    for i in range(160):
        words = rng.sample(QUERY_WORDS, rng.randint(2, 7))
        rows.append({"id": f"q{i}", "kind": "query", "text": " ".join(words)})
    for i in range(160):
        language = rng.choice(list(SENTENCES))
        own = SENTENCES[language]
        n = rng.choice([3, 5, 8, 12, 20, 30, 40])
        text = " ".join(rng.choice(own if rng.random() < 0.8 else all_sentences) for _ in range(n))
        rows.append({"id": f"p{i}", "kind": "passage", "language": language, "text": text})
    rng.shuffle(rows)
    path = Path(__file__).with_name("corpus.jsonl")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} texts to {path}")


if __name__ == "__main__":
    main()
