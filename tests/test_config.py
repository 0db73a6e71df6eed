"""Settings read from the environment: the new choices and their defaults."""

from __future__ import annotations

import pytest

from bge_trio.config import ConfigError, Settings
from bge_trio.model.loading import choose_dtype


def test_defaults_are_auto_and_truncate() -> None:
    settings = Settings.from_env({})
    assert settings.workers is None  # auto
    assert settings.dtype == "auto"
    assert settings.long_input == "truncate"
    assert settings.express_tokens == 256


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"BGE_TRIO_WORKERS": "auto"}, "workers", None),
        ({"BGE_TRIO_WORKERS": "3"}, "workers", 3),
        ({"BGE_TRIO_LONG_INPUT": "chunk"}, "long_input", "chunk"),
        ({"BGE_TRIO_TRUNCATE": "false"}, "long_input", "error"),  # the older switch
        ({"BGE_TRIO_TRUNCATE": "false", "BGE_TRIO_LONG_INPUT": "chunk"}, "long_input", "chunk"),
        ({"BGE_TRIO_EXPRESS_TOKENS": "0"}, "express_tokens", 0),
        ({"BGE_TRIO_DTYPE": "BF16"}, "dtype", "bf16"),
        ({}, "score_weights", (1.0, 1.0, 1.0)),
        ({"BGE_TRIO_SCORE_WEIGHTS": "0.4, 0.2,0.4"}, "score_weights", (0.4, 0.2, 0.4)),
    ],
)
def test_settings_read_their_variables(env: dict[str, str], field: str, value: object) -> None:
    assert getattr(Settings.from_env(env), field) == value


def test_an_overlap_that_leaves_a_window_no_new_tokens_is_refused() -> None:
    with pytest.raises(ConfigError, match="CHUNK_OVERLAP=64 must be under half"):
        Settings.from_env({"BGE_TRIO_CHUNK_WINDOW": "100"})
    ok = Settings.from_env({"BGE_TRIO_CHUNK_WINDOW": "100", "BGE_TRIO_CHUNK_OVERLAP": "40"})
    assert (ok.chunk_window, ok.chunk_overlap) == (100, 40)


@pytest.mark.parametrize(
    "raw", ["1,1", "1,1,1,1", "0,0,0", "1,-1,1", "a,b,c", "inf,1,1", "nan,1,1"]
)
def test_score_weights_must_be_three_non_negative_numbers_not_all_zero(raw: str) -> None:
    with pytest.raises(ConfigError, match=f"BGE_TRIO_SCORE_WEIGHTS='{raw}': expected three"):
        Settings.from_env({"BGE_TRIO_SCORE_WEIGHTS": raw})


@pytest.mark.parametrize(
    ("asked", "native", "served"),
    [
        ("auto", True, "bf16"),
        ("auto", False, "fp32"),
        ("bf16", False, "bf16"),  # asked for: served, emulated (the reason says so)
        ("bf16", True, "bf16"),
        ("fp32", True, "fp32"),
        ("int8", False, "int8"),
    ],
)
def test_auto_picks_bf16_only_where_the_cpu_computes_it_natively(
    asked: str, native: bool, served: str
) -> None:
    dtype, reason = choose_dtype(asked, native)
    assert dtype == served
    assert reason  # /info says why
    if asked == "auto":
        assert reason.startswith("auto:")
    assert ("emulated" in reason) == (served == "bf16" and not native)


def test_several_models_are_a_comma_separated_list_each_optionally_named() -> None:
    settings = Settings.from_env(
        {
            "BGE_TRIO_MODEL": " m3=/models/bge-m3 , /models/bge-reranker-v2-m3",
            "BGE_TRIO_MAX_SEQ_LENGTH": "4096",
            "BGE_TRIO_RERANK_MAX_LENGTH": "1024",
        }
    )
    first, second = settings.models()
    assert (first.name, first.spec) == ("m3", "/models/bge-m3")
    assert (second.name, second.spec) == (None, "/models/bge-reranker-v2-m3")
    embedder = settings.for_model(first, reranker=False)
    assert (embedder.model, embedder.model_name, embedder.max_seq_length) == (
        "/models/bge-m3",
        "m3",
        4096,
    )
    reranker = settings.for_model(second, reranker=True)
    assert (reranker.model_name, reranker.max_seq_length) == (None, 1024)
    assert Settings.from_env({}).models()[0].spec == "BAAI/bge-m3"  # one model, as before


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BGE_TRIO_MODEL": "a,,b"}, "comma-separated list"),
        ({"BGE_TRIO_MODEL": "=/models/x"}, "comma-separated list"),
        ({"BGE_TRIO_MODEL": "x=/a,x=/b"}, "same name"),
        ({"BGE_TRIO_MODEL": "/a,/b", "BGE_TRIO_MODEL_NAME": "one"}, "MODEL_NAME names one"),
    ],
)
def test_a_model_list_that_cannot_be_served_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)
