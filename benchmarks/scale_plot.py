"""The store benchmark's plot: search p95 and bytes per passage against corpus size.

    python -m clara_benchmarks.scale_plot docs/benchmarks/store_scale.png docs/benchmarks/store_scale_*k.json

Each JSON file is one ``clara_benchmarks.store_scale`` run; a store configuration becomes one
line across the runs' sizes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from clara_plugins.atomic import write_file_atomically  # noqa: E402
from clara_plugins.checks import check_output_path  # noqa: E402

from .report import png_bytes  # noqa: E402


def series(reports: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """(passages, p95 ms, disk bytes per passage) of each store configuration, by size."""
    lines: dict[str, list[tuple[int, float, float]]] = {}
    for report in sorted(reports, key=lambda r: r["passages"]):
        for store in report["stores"]:
            name = f"{store['index']} / {store['memory_dtype']}" + (
                f" (rescore {store['rescore_factor']})" if store.get("rescore_factor") else "")  # not in older files
            lines.setdefault(name, []).append((report["passages"], store["search_ms"]["p95"],
                                               store["disk_bytes_per_passage"]["total"]))
    return lines


def plot(reports: list[dict], path: Path) -> None:
    figure, (latency, disk) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in series(reports).items():
        sizes, p95, size_bytes = zip(*points)
        latency.plot(sizes, p95, marker="o", label=name)
        disk.plot(sizes, size_bytes, marker="o", label=name)
    for axis, title in ((latency, "search p95 (ms)"), (disk, "disk bytes per passage")):
        axis.set_xscale("log")
        axis.set_xlabel("passages")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    latency.set_yscale("log")
    disk.legend(fontsize=8)
    data = png_bytes(figure)
    write_file_atomically(path, lambda handle: handle.write(data), binary=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("reports", type=Path, nargs="+", help="store_scale JSON files")
    args = parser.parse_args()
    if args.out.suffix.lower() != ".png":  # the PNG forgotten: the first report was written over
        parser.error(f"the plot is written as a .png, not {args.out}")
    check_output_path(args.out, *args.reports)
    reports = [json.loads(path.read_text()) for path in args.reports]
    for path, report in zip(args.reports, reports):  # another benchmark's JSON failed on a bare KeyError
        if not isinstance(report, dict) or not {"passages", "stores"} <= report.keys():
            parser.error(f"{path} is not a store_scale report (it has no passages and stores)")
    plot(reports, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
