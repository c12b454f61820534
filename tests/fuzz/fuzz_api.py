#!/usr/bin/env python3
"""Fuzz qgate's reviewer API from its own OpenAPI document with schemathesis.

Starts `qgate-agent/examples/api_fuzz_server.rs` on a fresh store, fetches
/v1/openapi.json with the server's admin token, runs schemathesis against
every operation but the endless event stream, and fails on any 5xx, any
response that breaks the document, or a server that died (a panic).

    pip install schemathesis      # 4.x
    AYA_BUILD_SKIP=1 python3 tests/fuzz/fuzz_api.py [--max-time 120] [extra st args...]

Exit status: schemathesis's, or 3 if the server died during the run.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Checks that must hold. Left out: `positive_data_acceptance` (valid-looking
# ids of requests that do not exist are a 404 by design) and
# `use_after_free` / `ensure_resource_availability` (the API creates nothing).
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "ignored_auth",
])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", default="60", help="seconds of fuzzing (default 60)")
    parser.add_argument("--st", default=shutil.which("st") or "st", help="schemathesis executable")
    args, extra = parser.parse_known_args()

    env = dict(os.environ, AYA_BUILD_SKIP="1")
    subprocess.run(
        ["cargo", "build", "-q", "-p", "qgate-agent", "--example", "api_fuzz_server"],
        cwd=ROOT, env=env, check=True,
    )
    with tempfile.TemporaryDirectory(prefix="qgate-fuzz-") as tmp:
        server = subprocess.Popen(
            [str(ROOT / "target/debug/examples/api_fuzz_server"), str(Path(tmp) / "qgate.sqlite")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            hello = json.loads(server.stdout.readline())
            url, token = hello["url"], hello["token"]
            request = urllib.request.Request(f"{url}/v1/openapi.json", headers={"Authorization": f"Bearer {token}"})
            schema = Path(tmp) / "openapi.json"
            schema.write_bytes(urllib.request.urlopen(request, timeout=10).read())
            result = subprocess.run(
                [args.st, "run", str(schema), "--url", url,
                 "--header", f"Authorization: Bearer {token}",
                 "--checks", CHECKS,
                 "--exclude-path", "/v1/events",
                 "--max-time", args.max_time,
                 "--request-timeout", "10",
                 *extra],
                # schemathesis keeps a cache in its working directory: keep it out of the repo.
                cwd=tmp,
            )
            if server.poll() is not None:
                print(f"qgate API server died during fuzzing (exit {server.returncode})", file=sys.stderr)
                return 3
            return result.returncode
        finally:
            if server.stdin:
                server.stdin.close()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
