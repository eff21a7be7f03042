"""Fit the link model to a ``dbgen.bench comm --links`` sweep; print its table and draw step time vs link rate.

    python benchmarks/link_sweep.py SWEEP.json --png benchmarks/netns_sweep_rvae.png

The fit (least squares over every mode and rate): ``step_s = base_s[mode] + 8 * bytes_per_step / (efficiency *
rate)``, bytes being dbgen's own count (``total_bytes_per_step``); ``efficiency`` is the share of the link rate
the collectives achieve (TCP/IP headers, acknowledgements, gloo's protocol, CPU), ``base_s`` a mode's compute plus
the time in collectives that does not scale with bytes (latency, waiting for the other worker). Reported: both,
R^2 of ``step_s`` and the mean and largest error of the predicted step time.
The plot (Pillow): measured step time per mode (solid, dots) and the model's (dashed), log-scaled rate axis.
"""

import argparse
import json
import math

from PIL import Image, ImageDraw

COLORS = {"dp": (31, 119, 180), "zero1": (214, 39, 40), "packed": (44, 160, 44), "packed_onebit": (148, 103, 189)}
UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def rate_bps(rate: str) -> float:
    for unit, scale in UNITS.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"link rate {rate!r}: expected <number>kbit|mbit|gbit")


def fit(rows: list[dict]) -> dict:
    """Least squares of ``step_s = base_s[mode] + 8 * bytes / (efficiency * rate)``: one base per mode (its
    compute and the time in collectives that does not scale with bytes), one efficiency for all."""
    xs = [8 * r["total_bytes_per_step"] / rate_bps(r["link_rate"]) for r in rows]
    ys = [r["step_s"] for r in rows]
    modes = sorted({r["mode"] for r in rows})
    mean = {
        m: [
            sum(v for r, v in zip(rows, vs, strict=True) if r["mode"] == m) / sum(r["mode"] == m for r in rows)
            for vs in (xs, ys)
        ]
        for m in modes
    }
    dx = [x - mean[r["mode"]][0] for r, x in zip(rows, xs, strict=True)]
    dy = [y - mean[r["mode"]][1] for r, y in zip(rows, ys, strict=True)]
    slope = sum(a * b for a, b in zip(dx, dy, strict=True)) / sum(a * a for a in dx)
    base = {m: mean[m][1] - slope * mean[m][0] for m in modes}
    for r, x in zip(rows, xs, strict=True):
        r["model_step_s"] = base[r["mode"]] + slope * x
    total = sum((y - sum(ys) / len(ys)) ** 2 for y in ys)
    r2 = 1 - sum((r["step_s"] - r["model_step_s"]) ** 2 for r in rows) / total
    err = [abs(r["model_step_s"] - r["step_s"]) / r["step_s"] for r in rows]
    return {
        "efficiency": 1 / slope,
        "base_s": base,
        "r2_step": r2,
        "max_step_error": max(err),
        "mean_step_error": sum(err) / len(err),
    }


def plot(rows: list[dict], path: str, title: str) -> None:
    w, h, left, right, top, bottom = 900, 560, 80, 170, 50, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    rates = sorted({rate_bps(r["link_rate"]) for r in rows})
    lo, hi = math.log10(rates[0]) - 0.15, math.log10(rates[-1]) + 0.15
    ymax = max(max(r["step_s"], r["model_step_s"]) for r in rows) * 1.08

    def xy(rate, t):
        return (
            left + (math.log10(rate) - lo) / (hi - lo) * (w - left - right),
            h - bottom - t / ymax * (h - top - bottom),
        )

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for rate in rates:
        x, _ = xy(rate, 0)
        label = f"{rate / 1e9:g} Gbit/s" if rate >= 1e9 else f"{rate / 1e6:g} Mbit/s"
        d.line([x, h - bottom, x, h - bottom + 5], fill="black")
        d.text((x - 30, h - bottom + 10), label, fill="black")
    step = 10 ** math.floor(math.log10(ymax / 2))
    step *= 5 if ymax / step > 25 else (2 if ymax / step > 10 else 1)
    t = 0.0
    while t <= ymax:
        _, y = xy(rates[0], t)
        d.line([left - 5, y, left, y], fill="black")
        d.text((left - 45, y - 6), f"{t:g}", fill="black")
        t += step
    d.text((w / 2 - 60, h - 25), "link rate (log scale)", fill="black")
    d.text((10, top - 30), "step time, s (solid: measured; dashed: model)", fill="black")
    d.text((left, 8), title, fill="black")
    for i, (mode, color) in enumerate(COLORS.items()):
        pts = sorted((rate_bps(r["link_rate"]), r["step_s"], r["model_step_s"]) for r in rows if r["mode"] == mode)
        if not pts:
            continue
        measured = [xy(rate, s) for rate, s, _ in pts]
        model = [xy(rate, m) for rate, _, m in pts]
        d.line(measured, fill=color, width=3)
        for x, y in measured:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        for (x0, y0), (x1, y1) in zip(model, model[1:], strict=False):  # dashed: 12 segments, every other drawn
            for k in range(0, 12, 2):
                d.line(
                    [
                        x0 + (x1 - x0) * k / 12,
                        y0 + (y1 - y0) * k / 12,
                        x0 + (x1 - x0) * (k + 1) / 12,
                        y0 + (y1 - y0) * (k + 1) / 12,
                    ],
                    fill=color,
                    width=2,
                )
        ly = top + 20 + 22 * i
        d.line([w - right + 15, ly, w - right + 45, ly], fill=color, width=3)
        d.text((w - right + 52, ly - 6), mode, fill="black")
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="JSON from python -m dbgen.bench comm --links ... --json")
    p.add_argument("--png", required=True, help="plot to write")
    p.add_argument("--json-out", default=None, help="write the sweep plus the fit here")
    args = p.parse_args(argv)
    with open(args.sweep) as f:
        sweep = json.load(f)
    rows = sweep["modes"]
    result = fit(rows)
    plot(
        rows,
        args.png,
        f"{sweep['config']}, {sweep['workers']} workers x {sweep['batch_per_worker']} images, "
        f"{sweep['machine']}, {sweep['date']}",
    )
    print(
        "| mode | link | total B/step (dbgen) | link tx B/step | step s | compute s | comm s | model step s | "
        "collectives/step | final loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['link_rate']} | {r['total_bytes_per_step']:,.0f} | "
            f"{r['link_tx_bytes_per_step']:,.0f} | {r['step_s']:.2f} | {r['compute_s']:.2f} | {r['comm_s']:.2f} | "
            f"{r['model_step_s']:.2f} | "
            f"{r['collectives_per_step']:g} | {r['final_loss']:.4f} |"
        )
    bases = ", ".join(f"{m} {b:.2f} s" for m, b in result["base_s"].items())
    print(
        f"\nfit: efficiency {result['efficiency']:.3f}, base per mode {bases}; R^2 (step_s) {result['r2_step']:.4f}, "
        f"step time error mean {result['mean_step_error']:.1%} / max {result['max_step_error']:.1%}"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({**sweep, "fit": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
