"""The HTTP API: request schemas, vector encodings, routes and error responses."""
