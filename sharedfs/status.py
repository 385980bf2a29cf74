"""`sharedfs status`: a view of a volume's cluster.

From the volume itself: which hosts hold a slot (and their heartbeats) and
how much of the journal is in use, as its header on storage says.  From
the lock master (`--master`, or the one a live host runs and names in its
slot): each host's lease, the locks and past images it holds, its counters
(cache hits and misses, transfers, storage I/O) and their rates over the
last seconds.  `--json` prints the same as
one JSON document (one per line with `--watch`); `--watch` repeats the
view every few seconds until interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import trio

from . import format as fmt
from . import journal
from . import protocol as p
from .cli_util import Parser, parse_address_arg, run_tool
from .directory import messages_per_transfer
from .errors import QuietError
from .link import LinkClosed, open_master, parse_address
from .storage import Storage, open_volume
from .tls import Tls, add_tls_arg, load_tls
from .volume import (
    live_slots,
    master_address,
    open_superblock,
    published_master,
    read_slot,
    slot_is_live,
)

ASK_TIMEOUT = 10.0
_CLEAR = "\033[H\033[2J"


async def ask_master(key: bytes, addr: tuple[str, int], tls: Tls | None = None) -> dict[str, Any]:
    where = f"master {addr[0]}:{addr[1]}"
    try:
        with trio.fail_after(ASK_TIMEOUT):
            link = await open_master(addr, key, -1, exitcode=1, tls=tls)
            try:
                await link.send(p.StatusRequest())
                while (msg := await link.receive()) is not None:
                    if isinstance(msg, p.StatusReply):
                        return msg.info
            finally:
                await link.aclose()
    except trio.TooSlowError:
        raise QuietError(f"{where} did not answer in {ASK_TIMEOUT:g} s", 1) from None
    except (p.ProtocolError, LinkClosed) as e:
        raise QuietError(f"{where}: {e}; is it a sharedfs master?", 1) from None
    raise QuietError(f"{where} closed the connection; is it a sharedfs master?", 1)


def volume_info(storage: Storage, sb: fmt.Superblock) -> dict[str, Any]:
    now = time.time_ns()
    hosts = []
    for n in range(sb.host_slots):
        s = read_slot(storage, sb, n)
        if not s.in_use and not s.mount_count:
            continue
        live = slot_is_live(s, now)
        hosts.append(
            {
                "node": n,
                "live": live,
                "hostname": s.hostname,
                "pid": s.pid,
                "mountpoint": s.mountpoint,
                "heartbeat_age_s": round((now - s.heartbeat_ns) / 1e9, 1),
                "mounts": s.mount_count,
                "runs_master": s.master if live else "",
            }
        )
    return {
        "volume": storage.name,
        "label": sb.label,
        "uuid": sb.uuid.hex(),
        "block_size": sb.block_size,
        "blocks": sb.volume_blocks,
        "host_slots": sb.host_slots,
        "hosts": hosts,
        "journal": journal.usage(storage, sb),
    }


def gather(
    storage: Storage, master: tuple[str, int] | None, tls: Tls | None = None
) -> dict[str, Any]:
    """Everything status shows.  A master given that cannot be asked is an
    error (QuietError); without one, the master a live host runs is asked,
    and if it does not answer, `master_error` says why."""
    sb = open_superblock(storage)
    info = volume_info(storage, sb)
    if master is None:
        found = published_master(storage, sb)
        if found is None:
            return info
        try:
            master = parse_address(found[1])
            return _with_master(info, storage, sb, master, tls)
        except (QuietError, ValueError) as e:
            info["master_error"] = f"{e} (the master host {found[0]} runs, by its slot)"
            return info
    return _with_master(info, storage, sb, master, tls)


def _with_master(
    info: dict[str, Any],
    storage: Storage,
    sb: fmt.Superblock,
    master: tuple[str, int],
    tls: Tls | None,
) -> dict[str, Any]:
    m = trio.run(ask_master, sb.cluster_key, master, tls)
    if "partitions" in m:  # one host's share of a spread directory: ask every host
        listeners = spread_listeners(storage, sb)
        m = merge_spread(trio.run(ask_spread, sb.cluster_key, listeners, tls, (master, m)))
    else:
        m["address"] = f"{master[0]}:{master[1]}"
    info["master"] = m
    # Node numbers as the JSON view has them, so both views read alike.
    m["hosts"] = {str(n): h for n, h in m["hosts"].items()}
    m["held"] = {str(n): h for n, h in m["held"].items()}
    m["rates"]["hosts"] = {str(n): r for n, r in m["rates"]["hosts"].items()}
    for node, h in m["hosts"].items():
        h["cache_hit_rate"] = hit_rate(h["counters"])
        rates = m["rates"]["hosts"].get(node)
        if rates:
            rates["cache_hit_rate"] = hit_rate(rates)
    return info


# -- a directory spread over the hosts -------------------------------------------------


def spread_listeners(storage: Storage, sb: fmt.Superblock) -> dict[int, tuple[str, int]]:
    """The live hosts of a spread directory, and where their masters listen
    (their slots say it, with the partitions they master)."""
    return {
        n: parse_address(master_address(slot))
        for n, slot in live_slots(storage, sb, watch=0).items()
        if "/" in slot.master
    }


async def ask_spread(
    key: bytes,
    listeners: dict[int, tuple[str, int]],
    tls: Tls | None = None,
    known: tuple[tuple[str, int], dict[str, Any]] | None = None,
) -> dict[int, dict[str, Any] | str]:
    """Every listener of a spread directory asked at once: node -> its
    reply, or why it gave none.  `known`: an address asked already and its
    reply, kept (as node -1 if no listener is at that address)."""
    out: dict[int, dict[str, Any] | str] = {}
    skip = -1
    if known is not None:
        asked, reply = known
        skip = next((n for n, a in listeners.items() if a == asked), -1)
        out[skip] = reply | {"address": f"{asked[0]}:{asked[1]}"}

    async def one(node: int, addr: tuple[str, int]) -> None:
        try:
            out[node] = await ask_master(key, addr, tls) | {"address": f"{addr[0]}:{addr[1]}"}
        except QuietError as e:
            out[node] = str(e)

    async with trio.open_nursery() as nursery:
        for node, addr in listeners.items():
            if node != skip:
                nursery.start_soon(one, node, addr)
    return out


def merge_spread(replies: dict[int, dict[str, Any] | str]) -> dict[str, Any]:
    """One master's view out of the listeners' replies (node -> reply, or
    why it gave none): every partition once, its directory's locks, past
    images, blocks and counters summed; a host's lease as its stalest
    master heard it; `partitions` says which host masters each."""
    parts: dict[int, tuple[int, dict[str, Any]]] = {}
    for node, reply in sorted(replies.items()):
        if isinstance(reply, dict):
            for k, st in reply["partitions"].items():
                parts.setdefault(int(k), (node, st))  # moving: either has it
    if not parts:
        why = "; ".join(r for r in replies.values() if isinstance(r, str))
        msg = "no host masters a partition of the spread directory now"
        raise QuietError(msg + (f": {why}" if why else ""), 1)
    statuses = [st for _, st in parts.values()]
    counters = _sums(st["counters"] for st in statuses)
    first = statuses[0]
    answered = [r for r in replies.values() if isinstance(r, dict)]
    return {
        "address": ", ".join(r.get("address", "?") for r in answered),
        "coherence": first["coherence"],
        "lease": first["lease"],
        "hosts": _stalest(st["hosts"] for st in statuses),
        "held": _held(st["held"] for st in statuses),
        "blocks_tracked": sum(st["blocks_tracked"] for st in statuses),
        "counters": counters,
        "messages_per_transfer": messages_per_transfer(counters),
        "recovering": sorted(set().union(*(st["recovering"] for st in statuses))),
        "rebuilding": any(st["rebuilding"] for st in statuses),
        "refused_connections": sum(st["refused_connections"] for st in statuses),
        "rejected_frames": sum(st["rejected_frames"] for st in statuses),
        "rates": {
            "window_s": max(st["rates"]["window_s"] for st in statuses),
            "master": _sums(st["rates"]["master"] for st in statuses),
            # A host's own counters: every partition's master hears the same.
            "hosts": {n: r for st in statuses for n, r in st["rates"]["hosts"].items()},
        },
        "partitions": {
            k: {
                "master": node,
                "hosts": sorted(st["hosts"]),
                "blocks_tracked": st["blocks_tracked"],
            }
            for k, (node, st) in sorted(parts.items())
        },
        "unanswered": {n: r for n, r in replies.items() if isinstance(r, str)},
    }


def _sums(dicts: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _stalest(hosts_of: Any) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for hosts in hosts_of:
        for n, h in hosts.items():
            if n not in out or h["heard_s"] > out[n]["heard_s"]:
                out[n] = h
    return out


def _held(helds: Any) -> dict[Any, dict[str, int]]:
    out: dict[Any, dict[str, int]] = {}
    for held in helds:
        for n, h in held.items():
            out[n] = _sums([out.get(n, {}), h])
    return out


def hit_rate(counters: dict[str, float]) -> float | None:
    """Share of block lookups the cache answered, or None before any."""
    hits, misses = counters.get("cache_hits", 0), counters.get("cache_misses", 0)
    return round(hits / (hits + misses), 4) if hits + misses else None


# -- the text view ---------------------------------------------------------------


def render(info: dict[str, Any]) -> str:
    out = [
        f"volume {info['volume']}: label {info['label']!r}, {info['blocks']} blocks of "
        f"{info['block_size']} bytes, {info['host_slots']} host slots"
    ]
    out.append(_render_journal(info))
    m = info.get("master")
    if m is not None:
        out += render_master(m)
    if "master_error" in info:
        out.append(f"master: {info['master_error']}")
    out += _render_hosts(info["hosts"], m)
    return "\n".join(out)


def _render_journal(info: dict[str, Any]) -> str:
    """Its use on storage; with the master, also as the hosts last saw it."""
    j = info["journal"]
    if "error" in j:
        return f"journal: header unreadable: {j['error']}"
    marks = ", ".join(f"node {n} page {s}" for n, s in j["unwritten_since"].items())
    seen = [
        h["counters"].get("log_pages_in_use", 0)
        for h in info.get("master", {}).get("hosts", {}).values()
    ]
    return (
        f"journal: {j['in_use']} of {j['pages']} pages in use ({j['percent']}%) on storage"
        + (f", up to {max(seen)} as the hosts last saw it" if seen else "")
        + f"; checkpoint at page {j['checkpoint']}"
        + (f"; oldest unwritten change: {marks}" if marks else "")
    )


def render_master(m: dict[str, Any]) -> list[str]:
    """The master's lines: its settings, size, share of a spread directory,
    recoveries and rates."""
    out = [
        f"master {m['address']}: coherence {m['coherence']}, lease {m['lease']:g} s, "
        f"{len(m['hosts'])} hosts joined, {m['blocks_tracked']} blocks tracked, "
        f"{m['messages_per_transfer']} messages per block transfer"
    ]
    if "partitions" in m:
        out.append("  " + _render_partitions(m))
    if m["recovering"]:
        out.append(f"  recovering dead nodes: {', '.join(map(str, m['recovering']))}")
    if m.get("rebuilding"):
        out.append("  rebuilding: waiting for the hosts to resume")

    r = m["rates"]["master"]
    if r:
        out.append(
            f"  last {m['rates']['window_s']:g} s: {r['lock_requests']:g} lock requests/s, "
            f"{r['transfers']:g} block transfers/s, {r['write_performs']:g} writes/s, "
            f"{r['messages_in'] + r['messages_out']:g} messages/s"
        )
    return out


def _render_partitions(m: dict[str, Any]) -> str:
    """Which host masters how many partitions, and who did not answer."""
    share: dict[int, int] = {}
    for part in m["partitions"].values():
        share[part["master"]] = share.get(part["master"], 0) + 1
    line = f"directory in {len(m['partitions'])} partitions: " + ", ".join(
        f"host {n} masters {k}" if n >= 0 else f"{k} by the address asked"
        for n, k in sorted(share.items())
    )
    for node, why in sorted(m["unanswered"].items()):
        line += f"; host {node}: {why}"
    return line


_SLOT_COLUMNS = ("node", "state", "host:pid", "mountpoint", "heartbeat", "mounts", "runs master")
_MASTER_COLUMNS = ("heard", "S", "X", "PIs", "hit rate", "sent/s", "recv/s", "reads/s", "writes/s")


def _render_hosts(hosts: list[dict[str, Any]], m: dict[str, Any] | None) -> list[str]:
    """One row per host slot ever used, as the volume has it; with the
    master, also what it knows: when it last heard from the host (its
    lease), the blocks it holds in S and X, its past images, its cache hit
    rate, blocks sent and received host to host and storage reads and writes
    per second."""
    if not hosts:
        return ["no host has mounted it yet"]
    header = _SLOT_COLUMNS + (_MASTER_COLUMNS if m is not None else ())
    rows = [list(header)]
    for h in hosts:
        node = str(h["node"])
        row = [
            node,
            "live" if h["live"] else "gone",
            f"{h['hostname']}:{h['pid']}",
            h["mountpoint"],
            f"{h['heartbeat_age_s']:g}s ago",
            str(h["mounts"]),
            h["runs_master"] or "-",
        ]
        if m is not None:
            row += _master_cells(m, node)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _master_cells(m: dict[str, Any], node: str) -> list[str]:
    joined = m["hosts"].get(node)
    if joined is None:
        return ["-"] * len(_MASTER_COLUMNS)
    held = m["held"].get(node, {})
    rates = m["rates"]["hosts"].get(node, {})
    rate = joined["cache_hit_rate"]
    return [
        f"{joined['heard_s']:.1f}s ago",
        str(held.get("S", 0)),
        str(held.get("X", 0)),
        str(held.get("pi", 0)),
        "-" if rate is None else f"{100 * rate:.1f}%",
        _rate(rates, "agent_transfers_sent"),
        _rate(rates, "agent_transfers_received"),
        _rate(rates, "cache_storage_reads"),
        _rate(rates, "cache_storage_writes"),
    ]


def _rate(rates: dict[str, float], key: str) -> str:
    return f"{rates[key]:g}" if key in rates else "-"


def render_counters(m: dict[str, Any]) -> str:
    """Every raw counter (status --counters)."""
    out = ["master counters:"]
    out += [f"  {k}: {v}" for k, v in m["counters"].items()]
    for node, h in m["hosts"].items():
        out.append(f"node {node} counters:")
        out += [f"  {k}: {v}" for k, v in sorted(h["counters"].items())]
    return "\n".join(out)


# -- the command ---------------------------------------------------------------------


def show(info: dict[str, Any], args: argparse.Namespace, watching: bool) -> None:
    if args.json:
        print(json.dumps(info, indent=None if watching else 2), flush=True)
        return
    text = render(info)
    if args.counters and "master" in info:
        text += "\n" + render_counters(info["master"])
    if watching and sys.stdout.isatty():
        text = _CLEAR + text
    elif watching:
        text = f"-- {time.strftime('%H:%M:%S')}\n{text}"
    print(text, flush=True)


def status(args: argparse.Namespace) -> None:
    if args.watch is not None and not args.watch > 0:
        raise QuietError(f"--watch {args.watch:g}: give a number of seconds above 0", 2)
    tls = load_tls(args.tls)
    storage = open_volume(args.volume)
    try:
        show(gather(storage, args.master, tls), args, args.watch is not None)
        if args.watch is None:
            return
        try:
            while True:
                time.sleep(args.watch)
                try:
                    info = gather(storage, args.master, tls)
                except QuietError as e:
                    # The master may be restarting: say so and keep watching.
                    info = volume_info(storage, open_superblock(storage))
                    info["master_error"] = str(e)
                show(info, args, True)
        except KeyboardInterrupt:
            return  # the way out of --watch
    finally:
        storage.close()


def main(argv: list[str] | None = None) -> None:
    ap = Parser(prog="sharedfs status", description=__doc__.splitlines()[0])
    ap.add_argument("volume", help="the volume (its cluster key authenticates us to the master)")
    ap.add_argument(
        "--master",
        type=parse_address_arg,
        metavar="HOST:PORT",
        help="also show the master's view: leases, locks, counters, rates",
    )
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="show it again every SECONDS (default 2) until interrupted",
    )
    ap.add_argument("--counters", action="store_true", help="also list every raw counter")
    add_tls_arg(ap)
    run_tool(status, ap.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
