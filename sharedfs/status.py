"""`sharedfs status`: which hosts have a volume mounted, read from the volume."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .cli_util import run_tool
from .storage import open_volume
from .volume import open_superblock, read_slot, slot_is_live


def status(args: argparse.Namespace) -> None:
    storage = open_volume(args.volume)
    try:
        sb = open_superblock(storage)
        now = time.time_ns()
        hosts = []
        for n in range(sb.host_slots):
            s = read_slot(storage, sb, n)
            if not s.in_use and not s.mount_count:
                continue
            hosts.append(
                {
                    "node": n,
                    "live": slot_is_live(s, now),
                    "hostname": s.hostname,
                    "pid": s.pid,
                    "mountpoint": s.mountpoint,
                    "heartbeat_age_s": round((now - s.heartbeat_ns) / 1e9, 1),
                    "mounts": s.mount_count,
                }
            )
    finally:
        storage.close()
    info = {
        "volume": args.volume,
        "label": sb.label,
        "uuid": sb.uuid.hex(),
        "block_size": sb.block_size,
        "blocks": sb.volume_blocks,
        "host_slots": sb.host_slots,
        "hosts": hosts,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.volume}: label {sb.label!r}, {sb.volume_blocks} blocks of {sb.block_size}")
    if not hosts:
        print("  no host has mounted it yet")
    for h in hosts:
        state = "live" if h["live"] else "gone"
        print(
            f"  node {h['node']}: {state}, {h['hostname']} pid {h['pid']} on {h['mountpoint']}, "
            f"heartbeat {h['heartbeat_age_s']} s ago, mounted {h['mounts']} times"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sharedfs status", description=__doc__.splitlines()[0])
    p.add_argument("volume")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    run_tool(status, p.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
