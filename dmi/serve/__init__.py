"""Serving many users from one armed engine (docs/serving.md).

- `policy`: what the operator allows, set at launch (hooks, bytes, interventions, retention,
  API keys -> tenants);
- `request`: one request's `dmi` field, parsed and checked against the policy (HTTP 400
  naming the field);
- `names`: the unique row ids requests are stored under, whatever id the client sent;
- `engine`: the engine side: which rows each request asked for, as per-step hook masks for
  the planner; the flush channel and the front-end watchdog;
- `asgi`: the front end: an ASGI middleware on the engine's own OpenAI-compatible server
  that injects each request's spec and serves `/v1/dmi/...`;
- `results`: a request's rows read back by the id the client sees (manifest, npy,
  safetensors, inline encoding).
"""
