"""``python -m benchmarks [NAME ...] [--quick] [--out DIR] [--list] [--report RESULTS.md]
[--threads N] [--no-peers] [--gpu-check]``.

With no NAME every registered benchmark runs. Results are printed and written as JSON to
``--out`` (default ``benchmarks/results``). The process runs on ``--threads`` CPUs (default 1:
torch's thread count and the CPU affinity that also bounds JAX/XLA; see benchmarks/peers.py).
``--gpu-check`` runs every CUDA test and the GPU benchmark table instead (see
benchmarks/gpu_check.py); without a CUDA device it says so and exits with status 77.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import peers
from .harness import discover, format_record, markdown_report, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results"), help="JSON folder"
    )
    parser.add_argument("--list", action="store_true", help="list benchmarks and exit")
    parser.add_argument("--report", metavar="PATH", default=None,
                        help="also write a Markdown report (e.g. benchmarks/RESULTS.md)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (torch) and CPUs (affinity, bounds JAX too); default 1")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the NumPyro/BlackJAX peer implementations")
    parser.add_argument("--gpu-check", action="store_true",
                        help="run the CUDA tests and the GPU benchmark table (needs CUDA)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.gpu_check:
        from .gpu_check import gpu_check

        return gpu_check(report=args.report, out_dir=args.out)
    torch.set_num_threads(args.threads)
    if argv is None:  # the real command line: pin the process (tests call main() in-process)
        peers.configure_cpus(args.threads)
    if args.no_peers:
        peers.disable("peers disabled (--no-peers)")
    registry = discover()
    if args.list:
        for name, bench in sorted(registry.items()):
            print(f"{name}: {bench.description.splitlines()[0] if bench.description else ''}")
        return 0
    names = args.names or sorted(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(sorted(registry))}",
              file=sys.stderr)
        return 2
    records = []
    for name in names:
        records.append(run(name, quick=args.quick, out_dir=args.out))
        print(format_record(records[-1]), flush=True)
    if args.report:
        command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.report, "w") as fh:
            fh.write(markdown_report(records, command.strip()) + "\n")
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
