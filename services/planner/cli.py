"""``megascale plan``: search the deployment plan for a model, hardware, prices and SLO.

Imports no torch unless ``--profile`` is given. Every bad input is a UserError (one line,
exit code 2, printed by services/cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.errors import UserError

from .hardware import CATALOGUE, HardwareProfile, HardwareSpec, get_gpu, load_profile, save_profile
from .models import PRESETS, load_model
from .search import Plan, search


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="search the disaggregated deployment plan for an MoE model",
        description="Search tp_a, tp_e, n_a, m and batch (paper Algorithm 1) for a model on the "
                    "given GPU types and report throughput per GPU / per cost vs colocated.")
    p.add_argument("--model", help=f"config.json path or preset ({', '.join(PRESETS)})")
    p.add_argument("--attention-gpu", default=None,
                   help=f"GPU type or comma list for attention (known: {', '.join(CATALOGUE)}); "
                        "default H20, or the profile's GPU with --hardware-profile")
    p.add_argument("--expert-gpu", default=None,
                   help="GPU type or comma list for experts; default L40S, or the profile's GPU")
    p.add_argument("--gpus", type=int, default=None, help="most GPUs the plan may use")
    p.add_argument("--slo-ms", type=float, default=150.0, help="time-between-tokens SLO (ms)")
    p.add_argument("--seq-len", type=int, default=730, help="average context length (tokens)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--simulate", action="store_true",
                   help="also replay the plan in the discrete-event simulator")
    p.add_argument("--hardware-profile", action="append", default=[], metavar="PATH",
                   help="plan with a measured hardware profile (repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="profile this machine with torch, write --profile-out, predict local "
                        "decode throughput, and exit")
    p.add_argument("--profile-out", default="hardware_profile.json", metavar="PATH")
    p.add_argument("--local-batch", type=int, default=16,
                   help="with --profile: sequences per attention replica to predict for")
    p.add_argument("--local-m", type=int, default=2, help="with --profile: micro-batches")
    p.set_defaults(func=run)


def _gpu_list(text: str, profiles: dict[str, HardwareSpec], flag: str) -> list[HardwareSpec]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"{flag}: give at least one GPU type")
    out = []
    for n in names:
        match = next((s for k, s in profiles.items() if k.lower() == n.lower()), None)
        out.append(match or get_gpu(n))
    return out


def run(args: argparse.Namespace) -> int:
    if args.slo_ms <= 0:
        raise UserError(f"--slo-ms must be positive, got {args.slo_ms:g}")
    if args.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.gpus is not None and args.gpus < 2:
        raise UserError(f"--gpus must be >= 2 (one per role), got {args.gpus}")
    if args.profile:
        return _run_profile(args)
    if not args.model:
        raise UserError("--model is required (a config.json path or a preset: "
                        f"{', '.join(PRESETS)})")
    shape = load_model(args.model)
    profiles = [load_profile(p) for p in args.hardware_profile]
    by_name = {p.spec.name: p.spec for p in profiles}
    default = profiles[0].spec.name if profiles else None
    attention = _gpu_list(args.attention_gpu or default or "H20", by_name, "--attention-gpu")
    expert = _gpu_list(args.expert_gpu or default or "L40S", by_name, "--expert-gpu")
    plan = search(shape, attention, expert, slo_s=args.slo_ms / 1e3, seq_len=args.seq_len,
                  max_gpus=args.gpus, profiles=profiles)
    out = plan.to_json()
    if args.simulate:
        from .simulator import simulate

        sim = simulate(shape.layers, plan.m, plan.est.t_a, plan.est.t_e, plan.est.t_c,
                       n_attention=plan.n_a, n_expert=plan.expert_nodes, batch=plan.est.batch)
        out["simulated_tbt_ms"] = sim.iteration_time * 1e3
        out["simulated_util_attention"] = sim.util_attention
        out["simulated_util_expert"] = sim.util_expert
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_plan(plan, out)
    return 0


def _print_plan(plan: Plan, out: dict) -> None:
    w = sys.stdout.write
    w(f"model            {plan.model}\n")
    w(f"attention        {plan.n_a} replicas x {plan.tp_a} {plan.attention_gpu} (tp_a={plan.tp_a})"
      f", {out['b_a']:.0f} seqs per micro-batch\n")
    w(f"experts          {plan.expert_nodes} nodes x {plan.tp_e} {plan.expert_gpu} "
      f"(tp_e={plan.tp_e}, {plan.experts_per_node} expert(s)/node), "
      f"{out['b_e']:.0f} tokens per expert\n")
    w(f"pipeline         m={plan.m} micro-batches, global batch {out['batch']}\n")
    w(f"GPUs / cost      {plan.gpus} GPUs, cost {plan.cost:.2f} (L20 = 1)\n")
    w(f"per layer        T_a={out['t_a_ms']:.3f} ms  T_e={out['t_e_ms']:.3f} ms  "
      f"T_c={out['t_c_ms']:.3f} ms\n")
    w(f"TBT              {out['tbt_ms']:.1f} ms\n")
    w(f"throughput       {out['tokens_per_s']:.0f} tok/s, {out['tokens_per_s_per_gpu']:.0f} "
      f"tok/s/GPU, {out['tokens_per_s_per_cost']:.0f} tok/s/cost\n")
    w(f"utilisation      attention {out['util_attention']:.0%}, experts "
      f"{out['util_expert']:.0%}\n")
    if "simulated_tbt_ms" in out:
        w(f"simulated        TBT {out['simulated_tbt_ms']:.1f} ms, attention "
          f"{out['simulated_util_attention']:.0%}, experts {out['simulated_util_expert']:.0%}\n")
    col = out["colocated"]
    if col:
        w(f"colocated        {col['gpus']} x {col['gpu']} (attention tp={col['tp_attn']}), batch "
          f"{col['batch']}, {col['tokens_per_s_per_gpu']:.0f} tok/s/GPU, TBT "
          f"{col['tbt_ms']:.1f} ms\n")
        w(f"vs colocated     {out['per_gpu_vs_colocated']:.2f}x per GPU, "
          f"{out['per_cost_vs_colocated']:.2f}x per cost\n")
    else:
        w("colocated        no colocated configuration meets the SLO\n")


def _run_profile(args: argparse.Namespace) -> int:
    from services.core.runtime import configure_threads

    from .profile import LOCAL_SHAPE, predict_local, profile_checkpoint, profile_machine

    configure_threads()
    shape = load_model(args.model) if args.model else LOCAL_SHAPE
    seq_len = args.seq_len if args.seq_len != 730 or args.model else 128
    if args.model and Path(args.model).is_dir() and any(Path(args.model).glob("*.safetensors")):
        # a checkpoint: time the real core layers the engine runs
        profile: HardwareProfile = profile_checkpoint(args.model, shape, seq_len=seq_len)
    else:
        profile = profile_machine(shape, seq_len=seq_len)
    save_profile(profile, args.profile_out)
    pred = predict_local(profile, shape, args.local_batch, args.local_m)
    out = {"profile": args.profile_out, "model": shape.name, "seq_len": seq_len,
           "measured_tflops": profile.spec.tflops, "copy_gbs": profile.copy_gbs,
           "prediction": pred}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"wrote {args.profile_out}: {shape.name}, context {seq_len}, "
              f"{profile.spec.tflops * 1e3:.1f} GFLOPS, copy {profile.copy_gbs:.1f} GB/s")
        print(f"predicted local decode: {pred['tokens_per_s']:.0f} tok/s "
              f"(batch {pred['batch']}, m={pred['m']}, TBT {pred['tbt_ms']:.2f} ms, "
              f"T_a={pred['t_a_ms']:.3f} T_e={pred['t_e_ms']:.3f} T_c={pred['t_c_ms']:.3f} ms)")
    return 0
