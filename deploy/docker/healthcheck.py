"""Container health check: exit 0 when the local pathguard answers 200 on /v2/health/ready, else 1.

Standard library only (the image has no curl). The port comes from ``PATHGUARD_PORT`` (default 8080); the
address is ``PATHGUARD_HOST`` unless that is a wildcard bind address, then 127.0.0.1. The readiness route
never needs the API key.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}  # noqa: S104 - these are compared against, not bound


def ready_url(env: dict[str, str]) -> str:
    """The readiness URL of the server configured by ``env``."""
    host = env.get("PATHGUARD_HOST", "127.0.0.1").strip()
    if host in WILDCARDS:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = int(env.get("PATHGUARD_PORT", "8080"))
    return f"http://{host}:{port}/v2/health/ready"


def main() -> int:
    url = ready_url(dict(os.environ))
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:  # noqa: S310 - fixed http URL to localhost
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
