#!/usr/bin/env python3
"""An example routing and authorized-keys service for fleetgate (docs/webhooks.md).

Standard library only. It answers from an inventory file, re-read at every request:

    {"users": {"alice": {"keys": ["ssh-ed25519 AAAA... alice@laptop"],
                         "machines": ["dev-alice", "box2"],
                         "upstream_user": "alice",
                         "disabled": "alice is on leave until Monday"}}}

`machines` lists what the user may reach, the first being the default; `disabled` (optional)
refuses every login with that message. Run it next to the gateway:

    python3 webhook_service.py --listen 127.0.0.1:8080 --inventory inventory.json --token-file token

and point fleetgate at it:

    [routing]
    type = "webhook"
    url = "http://127.0.0.1:8080/route"
    keys_url = "http://127.0.0.1:8080/keys"
    token_file = "token"

A real service would sit behind TLS (fleetgate's ca_file / cert_file for mutual TLS) and look
users up in the team's directory instead of a file.
"""

from __future__ import annotations

import argparse
import hmac
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def route(inventory: dict, req: dict) -> dict:
    user = inventory.get("users", {}).get(req.get("user"))
    if user is None:
        return {"allow": False, "message": f"{req.get('user')} has no machine here; ask your team lead"}
    if user.get("disabled"):
        return {"allow": False, "message": user["disabled"]}
    machines = user.get("machines", [])
    want = req.get("target") or (machines[0] if machines else None)
    if want not in machines:
        return {"allow": False, "message": f"{req['user']} may not use {want}"}
    answer = {"allow": True, "machine": want, "machines": machines}
    if user.get("upstream_user"):
        answer["upstream_user"] = user["upstream_user"]
    return answer


def keys(inventory: dict, req: dict) -> dict:
    # A disabled user still gets their keys: the route answer then tells them why they are refused.
    user = inventory.get("users", {}).get(req.get("user"), {})
    return {"keys": user.get("keys", [])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:8080")
    ap.add_argument("--inventory", type=Path, required=True)
    ap.add_argument("--token-file", type=Path)
    args = ap.parse_args()
    token = args.token_file.read_text().strip() if args.token_file else None
    handlers = {"/route": route, "/keys": keys}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            given = self.headers.get("Authorization", "")
            if token is not None and not hmac.compare_digest(given, f"Bearer {token}"):
                return self.answer(401, {"error": "bad token"})
            if self.path not in handlers:
                return self.answer(404, {"error": "no such path"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                inventory = json.loads(args.inventory.read_text())
            except (ValueError, OSError) as exc:
                return self.answer(500, {"error": str(exc)})
            self.answer(200, handlers[self.path](inventory, req))

        def answer(self, status: int, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    print(f"listening on {host}:{server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
