"""peers.json and the table: pure functions of the workers' results (no torch), so they can be tested."""

from __future__ import annotations

FIELDS = ("time_ratio", "memory_ratio", "matches_keel", "error")


def assemble(results: dict[str, dict], cases: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """``{library: {case: {time_ratio, memory_ratio, matches_keel, error}}}``: every case of every library,
    a missing case being an error rather than a gap."""
    peers: dict[str, dict[str, dict]] = {}
    for library, payload in results.items():
        got = payload.get("cases", {})
        peers[library] = {}
        for case in cases:
            r = got.get(case)
            if r is None:
                r = {"error": payload.get("error") or "no result for this case"}
            peers[library][case] = {f: r.get(f) for f in FIELDS}
    return peers


def _cell(r: dict, workaround: bool) -> str:
    if r["time_ratio"] is None:
        return "fails"
    mem = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
    same = {True: "yes", False: "NO", None: "ref"}[r["matches_keel"]]
    return f"{r['time_ratio']:.2f} / {mem} / {same}" + (" *" if workaround else "")


def table(peers: dict[str, dict[str, dict]], cases: tuple[str, ...], details: dict | None = None) -> str:
    """Markdown: one row per library, each cell ``time ratio / memory ratio / equals keel``; ``*``: fails on
    the PeftModel itself, measured on its ``get_base_model()``."""
    details = details or {}
    lines = [
        "| library | " + " | ".join(cases) + " |",
        "|---|" + "---|" * len(cases),
    ]
    for library, by_case in peers.items():
        cells = []
        for case in cases:
            extra = details.get(library, {}).get("cases", {}).get(case, {})
            cells.append(_cell(by_case[case], bool(extra.get("workaround"))))
        lines.append(f"| {library} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def errors(peers: dict[str, dict[str, dict]]) -> list[str]:
    return [
        f"{lib} {case}: {r['error']}" for lib, by in peers.items() for case, r in by.items() if r["error"]
    ]


def keel_slower(
    peers: dict[str, dict[str, dict]], reference: str = "keel"
) -> list[tuple[str, str, float, float]]:
    """(library, case, keel's time ratio, the peer's) wherever keel's ratio is above a peer's."""
    ours = peers.get(reference, {})
    out = []
    for library, by_case in peers.items():
        if library == reference:
            continue
        for case, r in by_case.items():
            k = ours.get(case, {}).get("time_ratio")
            if k is not None and r["time_ratio"] is not None and k > r["time_ratio"]:
                out.append((library, case, k, r["time_ratio"]))
    return out
