"""`sharedfs status`: which hosts have a volume mounted, read from the volume."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import trio

from . import protocol as p
from .cli_util import Parser, run_tool
from .errors import QuietError
from .link import Link, LinkClosed, parse_address
from .storage import open_volume
from .volume import open_superblock, read_slot, slot_is_live


async def ask_master(key: bytes, addr: tuple[str, int]) -> dict[str, Any]:
    try:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(*addr)
            link = await Link.open(stream, key, -1, initiator=True)
            await link.send(p.StatusRequest())
            async for msg in link.messages():
                if isinstance(msg, p.StatusReply):
                    await link.aclose()
                    return msg.info
    except OSError as e:
        raise QuietError(f"cannot reach master {addr[0]}:{addr[1]}: {e.strerror or e}", 1) from None
    except trio.TooSlowError:
        raise QuietError(f"master {addr[0]}:{addr[1]} did not answer", 1) from None
    except (p.ProtocolError, LinkClosed) as e:
        raise QuietError(f"master {addr[0]}:{addr[1]}: {e}", 1) from None
    raise QuietError(f"master {addr[0]}:{addr[1]} closed the connection", 1)


def print_master(info: dict[str, Any]) -> None:
    print(
        f"master: coherence {info['coherence']}, {info['blocks_tracked']} blocks tracked, "
        f"{info['messages_per_transfer']} messages per block transfer"
    )
    for node, h in info["hosts"].items():
        held = info["held"].get(node, {})
        print(
            f"  node {node}: peer port {h['peer'][1]}, holds {held.get('S', 0)} S, "
            f"{held.get('X', 0)} X, {held.get('pi', 0)} past images"
        )
        for k, v in sorted(h["counters"].items()):
            print(f"      {k}: {v}")
    print("  master counters:")
    for k, v in info["counters"].items():
        print(f"      {k}: {v}")


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
    if args.master:
        try:
            addr = parse_address(args.master)
        except ValueError as e:
            raise QuietError(f"--master {args.master}: {e}", 2) from None
        info["master"] = trio.run(ask_master, sb.cluster_key, addr)
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
    if "master" in info:
        print_master(info["master"])


def main(argv: list[str] | None = None) -> None:
    ap = Parser(prog="sharedfs status", description=__doc__.splitlines()[0])
    ap.add_argument("volume", help="the volume (its cluster key authenticates us to the master)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument(
        "--master", metavar="HOST:PORT", help="also show the master's view and counters"
    )
    run_tool(status, ap.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
