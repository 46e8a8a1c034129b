"""The S3-compatible store scripts/container-test uploads to from the image: SeaweedFS on
127.0.0.1 (tests._s3), run on the host with the project's environment.

    python -m tests.container.s3store serve DIR        start the store, write DIR/store.json
                                                       (endpoint, keys); stop it on SIGTERM
    python -m tests.container.s3store fetch DIR OUT N  copy every object of the bucket into OUT;
                                                       exit status 0 when there are at least N
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from tests._s3 import ACCESS_KEY, SECRET_KEY, S3Server

BUCKET = "gateway"


def serve(directory: Path) -> int:
    """Run the store until SIGTERM or SIGINT; its address and keys go to ``store.json``."""
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    server = S3Server(buckets=(BUCKET,))
    try:
        server.start()
        info = {"endpoint": server.endpoint, "access_key": ACCESS_KEY, "secret_key": SECRET_KEY}
        tmp = directory / "store.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.rename(directory / "store.json")
        print(f"S3 store on {server.endpoint}, pid {server.pid}", flush=True)
        signal.sigwait(stop)
    finally:
        server.close()
    return 0


def fetch(directory: Path, out: Path, n: int) -> int:
    """Copy the bucket's objects into ``out`` (named after the last part of their keys)."""
    import boto3

    info = json.loads((directory / "store.json").read_text())
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=info["endpoint"],
        aws_access_key_id=info["access_key"],
        aws_secret_access_key=info["secret_key"],
        region_name="us-east-1",
    )
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            keys.append(item["Key"])
            body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            (out / item["Key"].rsplit("/", 1)[-1]).write_bytes(body)
    client.close()
    print(f"{len(keys)} objects")
    return 0 if len(keys) >= n else 1


def main(argv: list[str]) -> int:
    """The command line above."""
    if len(argv) == 2 and argv[0] == "serve":
        return serve(Path(argv[1]))
    if len(argv) == 4 and argv[0] == "fetch":
        return fetch(Path(argv[1]), Path(argv[2]), int(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
