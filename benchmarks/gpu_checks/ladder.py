"""The ladder check: bench_ladder.py's rungs, each in its own process."""

from __future__ import annotations

from .common import Context


def check_ladder(ctx: Context) -> str:
    """bench_ladder.py's rungs, each in its own process, each written to the report when measured."""
    import bench_ladder

    s = ctx.shape.ladder
    argv = ["--device", ctx.device.type, "--preset", s["preset"], "--seq-len", str(s["seq_len"])]
    argv += ["--batch-size", str(s["batch_size"]), "--steps", str(s["steps"]), "--warmup", str(s["warmup"])]
    args = bench_ladder.parse_args(argv)
    peak, source = bench_ladder.device_peak(args)
    flops = bench_ladder.flops_per_token(args)
    ctx.report["ladder"] = {"shape": s, "device_peak_flops": peak, "device_peak_source": source}
    rungs = ctx.report["rungs"] = []
    last_wall = 0.0
    for rung in bench_ladder.ladder():
        reason = bench_ladder.skip_reason(rung, args.device)
        if not reason and ctx.args.smoke and rung.name != "fp32":
            reason = "--smoke measures the first rung only, which proves the worker (compiled rungs: 30 to 55 s each)"
        # A rung takes about as long as the one before, and a compiled one a minute at least (cold cache).
        compiles = bench_ladder.effective_settings(rung.name, args.device).compile
        estimate = max(last_wall, 60.0 if compiles else 0.0)
        if not reason and ctx.elapsed() + estimate > ctx.args.budget:
            reason = f"time budget: {ctx.elapsed():.0f} s of --budget {ctx.args.budget:.0f} s spent"
        if reason:
            rungs.append({"name": rung.name, "change": rung.change, "tokens_per_s": None, "reason": reason})
        else:
            rungs.append(bench_ladder.measure_rung(rung, args, peak, flops))
            last_wall = rungs[-1].get("wall_seconds") or 0.0
        ctx.write()
    measured = [r for r in rungs if r["tokens_per_s"] is not None]
    failed = [r["name"] for r in rungs if r["tokens_per_s"] is None and r["reason"].startswith("failed")]
    best = max(measured, key=lambda r: r["tokens_per_s"], default=None)
    detail = f"{len(measured)} of {len(rungs)} rungs measured"
    if best:
        detail += f"; fastest {best['name']} {best['tokens_per_s']:,.0f} tokens/s, MFU {best.get('mfu', 0):.1%}"
    if failed:
        raise AssertionError(f"{detail}; failed: {', '.join(failed)}")
    return detail
