"""Human tables the CLI prints (eval rows)."""

from __future__ import annotations


def fmt(v, width: int, spec: str, suffix: str = "") -> str:
    return ("-" if v is None else format(v, spec) + suffix).rjust(width)


def print_eval(report: dict) -> None:
    cfg, ref = report["config"], report.get("reference", {})
    print(f"{cfg['num']} samples, seed {cfg['seed']}, {cfg['steps']} {cfg.get('sampler', 'ddim')} steps, eta {cfg['eta']}, "
          f"guidance {cfg['guidance']}" + (f", quantized rows on {report['backend']}" if report.get("backend") else ""))
    rows = report["rows"]
    w = max(12, 2 + max(len(r["precision"]) for r in rows))
    lat = any("unet_ms" in r for r in rows)
    print(f"{'precision':<{w}}{'FD':>9}{'FD vs FP':>10}{'class acc':>11}{'PSNR vs FP':>12}{'eps MSE':>11}"
          f"{'BOPs saving':>13}" + (f"{'UNet ms':>9}" if lat else f"{'seconds':>9}")
          + (f"{'img/s':>8}" if any("images_per_s" in r for r in rows) else ""))
    for r in rows:
        acc = None if r.get("class_acc") is None else 100 * r["class_acc"]
        print(f"{r['precision']:<{w}}{fmt(r.get('fd'), 9, '.2f')}{fmt(r.get('fd_vs_fp'), 10, '.2f')}"
              f"{fmt(acc, 11, '.1f', '%')}"
              f"{fmt(r.get('psnr_vs_fp'), 12, '.2f')}{fmt(r.get('eps_mse_mean'), 11, '.2e')}"
              f"{fmt(r.get('bops_saving'), 12, '.1f', 'x')}"
              + (fmt(r.get("unet_ms"), 9, ".2f") if lat else f"{r['seconds']:9.1f}")
              + (fmt(r.get("images_per_s"), 8, ".1f") if any("images_per_s" in r for r in rows) else ""))
    if ref:
        print(f"for scale: FD real vs real {ref['fd_real_half_vs_half']:.2f} (two halves of all digits), "
              f"{ref['fd_real_train_vs_held_out']:.2f} (train vs held-out at this sample count); "
              f"classifier accuracy on held-out digits {100 * ref['classifier_acc_held_out']:.1f}%")
