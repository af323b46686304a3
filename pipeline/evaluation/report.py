"""The evaluation report as text: the summary table the stages print and report.md."""
from __future__ import annotations

from pipeline.evaluation.tasks import TARGET


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(report: dict) -> str:
    """Final-layer norms and outliers per model (printed by the demo)."""
    rows = ["| model | mean norm | max norm | outliers / image | abs. outliers / image | cosine to target |",
            "|---|---|---|---|---|---|"]
    for name, s in report["norms"].items():
        cos = 1.0 if name == TARGET else report.get("cosine_to_target", {}).get(name)
        rows.append(f"| {name} | {s['norm_mean']:.2f} | {s['norm_max']:.2f} | {s['outliers_per_image']:.2f} | "
                    f"{fmt(s.get('abs_outliers_per_image'))} | {fmt(cos, 4)} |")
    return "\n".join(rows)


def norm_table(norms: dict) -> str:
    rows = ["| model | mean | median | p99 | max | outliers / image | max / image | outlier fraction | abs. outliers / image |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, s in norms.items():
        rows.append(f"| {name} | {s['norm_mean']:.2f} | {s['norm_median']:.2f} | {s['norm_p99']:.2f} | {s['norm_max']:.2f} | "
                    f"{s['outliers_per_image']:.2f} | {s['outliers_per_image_max']:.0f} | {s['outlier_fraction']:.4f} | "
                    f"{fmt(s.get('abs_outliers_per_image'))} |")
    return "\n".join(rows)


def registers_section(location: dict | None) -> list[str]:
    """The register neurons the test-time-registers baseline moves, with how they were found."""
    if not location:
        return []
    lines = ["## Test-time registers: register neurons", "",
             f"Outlier tokens: norm > {location['threshold']:.2f} after block {location['detect_block']} "
             f"({location['images_with_outliers']} of {location['images']} images have some); neurons of blocks "
             f"0..{location['max_block']} ranked by their mean |activation| at those tokens.", "",
             "| block | neuron | score |", "|---|---|---|"]
    lines += [f"| {n['layer']} | {n['index']} | {n['score']:.3f} |" for n in location["neurons"]]
    if location.get("sweep"):
        tried = ", ".join(f"k={k}: {left:.2f}" for k, left in location["sweep"].items())
        lines += ["", f"top-k swept until the outliers vanish (outlier tokens per image left): {tried}; "
                      f"kept k={len(location['neurons'])}."]
    return lines + [""]


def zeroshot_section(z: dict | None) -> list[str]:
    """Zero-shot mIoU per model and IoU per class, models side by side."""
    if not z:
        return []
    models = list(z["models"])
    lines = ["## Zero-shot segmentation", "", f"Labeled set `{z['labeled']}` ({z['images']} {z['split']} images); "
             f"{z['protocol']}.", "", "| class | " + " | ".join(models) + " |", "|---|" + "---|" * len(models),
             "| **mIoU** | " + " | ".join(fmt(z["models"][m]["miou"], 4) for m in models) + " |"]
    for c in z["classes"]:
        lines.append(f"| {c} | " + " | ".join(fmt(z["models"][m]["iou"][c], 3) for m in models) + " |")
    return lines + [""] + [f"![{name}]({name})" for name in z["figures"]] + [""]


def markdown(report: dict) -> str:
    img, rule, figs = report["images"], report["outlier_rule"], report.get("figures", {})
    lines = ["# Evaluation", ""]
    lines += [f"- **{name}**: {what}" for name, what in report["models"].items()]
    lines += [f"- **images**: {img['count']} from `{img['shards']}` (corpus {img['corpus_id']}, global indices "
              f"{img['indices'][0]}..{img['indices'][-1]})"]
    if img["note"]:
        lines += [f"- **note**: {img['note']}"]
    lines += [f"- **outliers**: {rule['relative']}; absolute thresholds: final layer {rule['abs_threshold_final']}, "
              f"residual stream {rule['abs_threshold_residual']}", ""]
    lines += registers_section(report.get("baselines", {}).get("test-time-registers"))
    lines += ["## Artifact tokens: final (normed) layer", "", norm_table(report["norms"]), ""]
    if report["residual"]["norms"]:
        lines += [f"## Artifact tokens: residual stream after block {report['residual']['block']} (before the final norm)", "",
                  norm_table(report["residual"]["norms"]), ""]
    if report["fidelity"]:
        lines += ["## Fidelity to the denoised targets", "", "| model | cosine | MSE |", "|---|---|---|"]
        lines += [f"| {n} | {f['cosine']:.4f} | {f['mse']:.4f} |" for n, f in report["fidelity"].items()] + [""]
    if report["attention"]:
        lines += ["## Class-token attention on outliers (last block)", "",
                  "Share of the class token's attention over patches that falls on outlier tokens; the outlier fraction is "
                  "what uniform attention would give.", "",
                  "| model | on final-layer outliers | final outlier fraction | on residual outliers | residual outlier fraction |",
                  "|---|---|---|---|---|"]
        lines += [f"| {n} | {fmt(a['on_final_outliers'], 3)} | {fmt(a['final_outlier_fraction'], 3)} | "
                  f"{fmt(a.get('on_residual_outliers'), 3)} | {fmt(a.get('residual_outlier_fraction'), 3)} |"
                  for n, a in report["attention"].items()] + [""]
    probes = report.get("probes")
    if probes:
        lines += ["## Dense linear probes", "", f"Labeled set `{probes['labeled']}` ({probes['splits']}); {probes['protocol']}"
                  + (f"; ridge {probes['ridge']:g}." if "ridge" in probes else "."), "",
                  "| model | seg. mIoU | seg. pixel acc. | depth RMSE (m) | depth AbsRel | depth δ<1.25 |", "|---|---|---|---|---|---|"]
        for n, r in probes["models"].items():
            s, d = r.get("segmentation", {}), r.get("depth", {})
            lines.append(f"| {n} | {fmt(s.get('miou'), 3)} | {fmt(s.get('pixel_accuracy'), 3)} | {fmt(d.get('rmse'), 3)} | "
                         f"{fmt(d.get('abs_rel'), 3)} | {fmt(d.get('delta_1.25'), 3)} |")
        lines.append("")
        lines += [f"![{name}]({name})" for name in probes["figures"]] + [""]
    lines += zeroshot_section(report.get("zeroshot"))
    lines += ["## Pictures", ""]
    for name, caption in figs.items():
        lines += [f"**{caption}**", "", f"![{name}]({name})", ""]
    return "\n".join(lines)
