#!/usr/bin/env python3
"""Fuzz qgate's reviewer API from its own OpenAPI document with schemathesis.

Starts `qgate-agent/examples/api_fuzz_server.rs` on a fresh store, fetches
/v1/openapi.json with the server's admin token, runs schemathesis against
every operation but the endless event stream, and fails on any 5xx, any
response that breaks the document, or a server that panicked or died.

    pip install schemathesis==4.32.5
    AYA_BUILD_SKIP=1 python3 tests/fuzz/fuzz_api.py [--max-time 120] [extra st args...]

`cargo test -p qgate-agent --test api_fuzz` runs it in a venv of its own.

Exit status: schemathesis's, or 3 if the server panicked or died.
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


def panic_messages(log: str) -> list[str]:
    """Each distinct panic in a Rust stderr log: location line and message, no backtrace."""
    lines = log.splitlines()
    seen: list[str] = []
    for i, line in enumerate(lines):
        if " panicked at " in line:
            where = line.split(" panicked at ", 1)[1]
            message = lines[i + 1] if i + 1 < len(lines) else ""
            panic = f"{where} {message}"
            if panic not in seen:
                seen.append(panic)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", default="60", help="seconds of fuzzing (default 60)")
    parser.add_argument("--st", default=shutil.which("st") or "st", help="schemathesis executable")
    parser.add_argument("--server", help="an api_fuzz_server already built (default: build it)")
    args, extra = parser.parse_known_args()

    server_bin = args.server
    if server_bin is None:
        env = dict(os.environ, AYA_BUILD_SKIP="1")
        subprocess.run(
            ["cargo", "build", "-q", "-p", "qgate-agent", "--example", "api_fuzz_server"],
            cwd=ROOT, env=env, check=True,
        )
        server_bin = str(ROOT / "target/debug/examples/api_fuzz_server")
    with tempfile.TemporaryDirectory(prefix="qgate-fuzz-") as tmp:
        # A panicking handler only loses its connection (schemathesis may call
        # that a network error, or not notice); its message on stderr is the proof.
        server_log = Path(tmp) / "server.log"
        with server_log.open("w") as log_file:
            server = subprocess.Popen(
                [server_bin, str(Path(tmp) / "qgate.sqlite")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                text=True, cwd=ROOT,
            )
        try:
            line = server.stdout.readline()
            if not line:
                server.wait(timeout=10)
                print(f"qgate API server did not start (exit {server.returncode})", file=sys.stderr)
                print(server_log.read_text(errors="replace"), file=sys.stderr)
                return 3
            hello = json.loads(line)
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
                print(server_log.read_text(errors="replace"), file=sys.stderr)
                return 3
            panics = panic_messages(server_log.read_text(errors="replace"))
            if panics:
                print(f"qgate API server panicked during fuzzing ({len(panics)} distinct panics, "
                      f"first 20):", file=sys.stderr)
                print("\n".join(panics[:20]), file=sys.stderr)
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
