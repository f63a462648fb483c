"""Per-device memory and FLOPs of the 7B stage-IV train step on the target meshes, as a table, from the
ahead-of-time compile-check results (benchmarks/results/compile_check_*.json, written by
benchmarks/compile_check.py). Nothing is compiled unless `--recompile` (which runs the existing compile check for
the missing or named cases: needs libtpu for TPU targets and takes many minutes per 7B case on a small host).

FLOPs: XLA's cost_analysis of the compiled step counts a scanned micro-batch body once, so it is also shown times
grad_accum (one body per micro-batch; the layer scan is inside the body and likewise counted once there, so this
remains an undercount); the train/flops.py formula (6 x active matmul parameters x tokens + attention) is the
figure MFU uses.

Step time and MFU: ESTIMATES, from benchmarks/results/step_estimate_<case>.json where one exists (written by
`benchmarks/compile_check.py --estimate CASE`): XLA's cost model (`optimal_seconds`) of the 1- and 2-layer
micro-batch programs extrapolated to the full depth and grad_accum, Pallas kernels at the chip's bf16 peak
(medplib_jax/train/step_estimate.py). Nothing here ran on a TPU.

    python benchmarks/aot_memory.py [--recompile [CASE ...]] [--out PATH]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

_MESH = re.compile(r"mesh (\{[^}]*\}); global batch (\d+) = (\d+) micro-batches of (\d+), length (\d+); "
                   r"remat '(\w+)'")
_MEM = re.compile(r'memory per device: arguments ([\d.]+) GiB, outputs ([\d.]+) GiB \(aliased ([\d.]+)\), '
                  r'temporaries ([\d.]+) GiB, code ([\d.]+) GiB -> total ([\d.]+) GiB')
_FLOPS = re.compile(r'XLA cost_analysis ([\d.]+) TFLOP over (\d+) devices .*formula ([\d.]+) TFLOP')
_OOM = re.compile(r'HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)')


def _from_result(result: dict) -> dict:
    """A JSON written from CheckResult.to_dict() (benchmarks/compile_check.py since 2026-12-07) -> a flat row."""
    gib = 2 ** 30
    m = result.get('memory') or {}
    accum = result['grad_accum']
    row = dict(case=result['case'], command=result.get('command'), date=result.get('date'),
               verdict=('FITS' if result['ok'] else 'DOES NOT FIT') + (' (estimate)' if 'ESTIMATE' in result['label']
                                                                       else ''),
               hbm_gib=result['hbm_bytes'] / gib, compile_s=result.get('compile_s'),
               estimate='ESTIMATE' in result['label'], mesh=str(result['mesh']), global_batch=result['batch'],
               grad_accum=accum, micro_batch=result['batch'] // accum, length=result['length'],
               remat=result['remat_policy'], devices=result['devices'],
               xla_tflop_per_device=result['flops_per_device'] / 1e12,
               formula_tflop_per_device=result['formula_flops'] / result['devices'] / 1e12)
    row['xla_tflop_per_device_x_accum'] = row['xla_tflop_per_device'] * accum
    if m:
        row.update(arguments_gib=m['arguments'] / gib, outputs_gib=m['outputs'] / gib, aliased_gib=m['aliased'] / gib,
                   temporaries_gib=m['temporaries'] / gib, code_gib=m['code'] / gib, total_gib=m['total'] / gib,
                   hbm_fraction=m['total'] / result['hbm_bytes'])
    return row


def _estimate(row: dict) -> dict:
    path = os.path.join(HERE, 'results', f'step_estimate_{row["case"]}.json')
    if os.path.exists(path):
        with open(path) as f:
            e = json.load(f)
        row.update(est_step_s=e['step_seconds'], est_mfu=e['mfu'],
                   est_recompute=e['step_flops_per_device'] * e['devices'] / e['model_flops'],
                   est_chip_use=e['step_flops_per_device'] / (e['step_seconds'] * e['peak_flops']))
    return row


def parse(result: dict) -> dict:
    """One compile-check JSON -> a flat row (None where the run did not report a figure)."""
    if 'memory' in result and 'label' in result:
        return _estimate(_from_result(result))
    text = '\n'.join(result.get('output') or []) + '\n' + str(result.get('compiler', ''))
    row = dict(case=result['case'], command=result.get('command'), date=result.get('date'),
               verdict=result.get('verdict'), hbm_gib=result.get('hbm_gib'), compile_s=result.get('compile_s'),
               estimate='ESTIMATE' in text or 'estimate' in str(result.get('verdict', '')))
    if m := _MESH.search(text):
        row.update(mesh=m.group(1), global_batch=int(m.group(2)), grad_accum=int(m.group(3)),
                   micro_batch=int(m.group(4)), length=int(m.group(5)), remat=m.group(6))
    if m := _MEM.search(text):
        args_, outs, aliased, temps, code, total = (float(x) for x in m.groups())
        row.update(arguments_gib=args_, outputs_gib=outs, aliased_gib=aliased, temporaries_gib=temps, code_gib=code,
                   total_gib=total)
    else:
        row.update(total_gib=result.get('memory_per_device_gib'), temporaries_gib=result.get('temporaries_gib'))
    if m := _OOM.search(text):
        row.update(temporaries_gib=float(m.group(1)), hbm_gib=row['hbm_gib'] or float(m.group(2)))
    if m := _FLOPS.search(text):
        xla, n, formula = float(m.group(1)), int(m.group(2)), float(m.group(3))
        row.update(devices=n, xla_tflop_per_device=xla / n, formula_tflop_per_device=formula / n)
        if row.get('grad_accum'):
            row['xla_tflop_per_device_x_accum'] = xla / n * row['grad_accum']
    if row.get('total_gib') and row.get('hbm_gib'):
        row['hbm_fraction'] = row['total_gib'] / row['hbm_gib']
    return _estimate(row)


def _fmt(v, spec='.2f'):
    return '-' if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ['| case | mesh | batch (accum x micro), length | remat | arguments | temporaries | total / HBM | '
             'verdict | XLA TFLOP/device (x accum) | formula TFLOP/device | step (estimate) | MFU (estimate) | '
             'compiled / formula FLOPs | compiled FLOPs / peak (estimate) |', '|' + '---|' * 14]
    for r in rows:
        lines.append(
            f'| {r["case"]}{" (estimate)" if r["estimate"] else ""} | {r.get("mesh", "-")} | '
            f'{r.get("global_batch", "-")} ({r.get("grad_accum", "-")} x {r.get("micro_batch", "-")}), '
            f'{r.get("length", "-")} | {r.get("remat", "-")} | {_fmt(r.get("arguments_gib"))} GiB | '
            f'{_fmt(r.get("temporaries_gib"))} GiB | {_fmt(r.get("total_gib"))} / {_fmt(r.get("hbm_gib"), "g")} GiB '
            f'({_fmt(r.get("hbm_fraction") and 100 * r["hbm_fraction"], ".1f")}%) | {r["verdict"]} | '
            f'{_fmt(r.get("xla_tflop_per_device"))} ({_fmt(r.get("xla_tflop_per_device_x_accum"), ".1f")}) | '
            f'{_fmt(r.get("formula_tflop_per_device"), ".1f")} | {_fmt(r.get("est_step_s"), ".2f")} s | '
            f'{_fmt(r.get("est_mfu") and 100 * r["est_mfu"], ".1f")}% | {_fmt(r.get("est_recompute"))} | '
            f'{_fmt(r.get("est_chip_use") and 100 * r["est_chip_use"], ".1f")}% |')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--recompile', nargs='*', default=None, metavar='CASE',
                        help='run benchmarks/compile_check.py for these cases (none named: the stage-IV cases '
                             'without a result)')
    parser.add_argument('--out', default=os.path.join(HERE, 'results', 'aot_memory.json'))
    args = parser.parse_args()
    if args.recompile is not None:
        import compile_check as cc  # benchmarks/compile_check.py
        names = args.recompile or [n for n in cc.CASES if n.startswith('stage4') and not os.path.exists(
            os.path.join(HERE, 'results', f'compile_check_{n}.json'))]
        if names:
            cc.main(names)
    rows = [parse(json.load(open(p))) for p in sorted(glob.glob(os.path.join(HERE, 'results',
                                                                            'compile_check_stage4-*.json')))]
    # cases estimated without a full-depth compile: their estimate alone
    for p in sorted(glob.glob(os.path.join(HERE, 'results', 'step_estimate_stage4-*.json'))):
        case = os.path.basename(p)[len('step_estimate_'):-len('.json')]
        if case not in {r['case'] for r in rows}:
            with open(p) as f:
                e = json.load(f)
            rows.append(_estimate(dict(case=case, command=e['command'], date=e['date'], verdict='not compiled at '
                                       'full depth', estimate=False, grad_accum=e['grad_accum'])))
    if not rows:
        sys.exit('no benchmarks/results/compile_check_stage4-*.json: run with --recompile')
    print(table(rows))
    with open(args.out, 'w') as f:
        json.dump(dict(benchmark='aot_memory', source='benchmarks/results/compile_check_stage4-*.json',
                       command=' '.join(sys.argv), rows=rows), f, indent=2)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
