"""
What did the adapters learn? LoRA §7.2 (subspace similarity) and §7.3 (amplification), on the rank sweep's adapters.

    python -m experiments.rank_sweep --task instruct --ranks 4,8,64 --targets "q,v"                 # the adapters
    python -m experiments.rank_sweep --task instruct --ranks 64 --targets "q,v" --seeds 2            # a second seed
    python -m experiments.subspace                                                                  # heat maps + table

§7.2: phi(A_r8, A_r64, i, j) compares the top-i right-singular directions of the r=8 adapter's A with the top-j of
the r=64 one (lora.subspace_similarity). The paper finds the top direction shared (phi > 0.5) and the rest mostly
not: "a low rank suffices". Across two seeds at r=64 the top directions agree more than random ones (j/d).
§7.3: how strongly does dW amplify directions already in W? Project W onto dW's top-r singular directions,
||U^T W V^T||_F, and compare with W's own top-r directions and random ones; the amplification factor is
||dW||_F / ||U^T W V^T||_F (the paper: ~21.5 at r=4, ~1.9 at r=64 for GPT-3's Wq).
"""

import argparse
import os

import torch
from safetensors.torch import load_file

from support.checkpoints import load_base_model
from support.files import save_figure_atomic


def subspace_similarity(A1, A2, i, j):
    """LoRA §7.2: phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), where U1, U2 hold the right
    singular vectors of A1 (r1 x d) and A2 (r2 x d) as d-dim columns, strongest first. 1: one top-i/top-j
    subspace contains the other; 0: they are orthogonal; random subspaces give about max(i, j) / d."""
    if A1.ndim != 2 or A2.ndim != 2 or A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"A1 and A2 must be (rank, d) matrices with the same d, got {tuple(A1.shape)} and {tuple(A2.shape)}"
        )
    if not (1 <= i <= A1.shape[0] and 1 <= j <= A2.shape[0]):
        raise ValueError(f"need 1 <= i <= {A1.shape[0]} and 1 <= j <= {A2.shape[0]}, got i={i}, j={j}")
    U1 = torch.linalg.svd(A1.detach().double(), full_matrices=False).Vh.T  # (d, r1), columns by singular value
    U2 = torch.linalg.svd(A2.detach().double(), full_matrices=False).Vh.T
    return (U1[:, :i].T @ U2[:, :j]).pow(2).sum().item() / min(i, j)


def load_run(runs_dir, task, rank, targets, seed):
    """(adapter tensors, its config) of one sweep run."""
    import json

    directory = os.path.join(runs_dir, f"{task}_r{rank}_{targets.replace(',', '')}_s{seed}")
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found; run python -m experiments.rank_sweep --task {task} --ranks {rank} --targets {targets} --seeds {seed} first"
        )
    with open(os.path.join(directory, "adapter_config.json")) as f:
        return load_file(path), json.load(f)


def stored_update(tensors, config, layer):
    """ΔW = scaling · B A of one layer of a saved adapter, in float64: what lora.LoRALinear.delta_weight gives for a
    live layer. A DoRA adapter's update also rescales W's rows, so it is refused rather than misread."""
    if config["use_dora"]:
        raise ValueError("a DoRA adapter's update is not B A alone (it rescales the rows of W0 + B A): use a LoRA run")
    scaling = config["alpha"] / (config["rank"] ** 0.5 if config["use_rslora"] else config["rank"])
    return scaling * tensors[f"{layer}.lora_B.weight"].double() @ tensors[f"{layer}.lora_A.weight"].double()


def amplification(W, dW, rank, generator):
    """LoRA §7.3 / Table 7: ||U^T W V^T||_F for U, V = dW's top-`rank` left/right singular vectors, W's own, and random
    orthonormal ones; and the amplification factor ||dW||_F / ||U^T W V^T||_F."""
    W = W.double()

    def projected(U, V):
        return torch.linalg.norm(U.T @ W @ V.T).item()

    U, _, Vh = torch.linalg.svd(dW)
    Uw, _, Vhw = torch.linalg.svd(W)
    Ur, _ = torch.linalg.qr(torch.randn(W.shape[0], rank, generator=generator, dtype=torch.float64))
    Vr, _ = torch.linalg.qr(torch.randn(W.shape[1], rank, generator=generator, dtype=torch.float64))
    along_dW = projected(U[:, :rank], Vh[:rank])
    return dict(
        rank=rank,
        along_dW=along_dW,
        along_W=projected(Uw[:, :rank], Vhw[:rank]),
        along_random=projected(Ur, Vr.T),
        norm_W=torch.linalg.norm(W).item(),
        norm_dW=torch.linalg.norm(dW).item(),
        factor=torch.linalg.norm(dW).item() / along_dW,
    )


def heat_map(ax, A1, A2, max_i, max_j, title):
    grid = torch.tensor([[subspace_similarity(A1, A2, i, j) for j in range(1, max_j + 1)] for i in range(1, max_i + 1)])
    image = ax.imshow(
        grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower", extent=(0.5, max_j + 0.5, 0.5, max_i + 0.5)
    )
    ax.set_xlabel("j")
    ax.set_ylabel("i")
    ax.set_title(title, fontsize=9)
    return image, grid


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", default="experiments/results/runs")
    parser.add_argument("--task", default="instruct")
    parser.add_argument("--targets", default="q,v", help="the target set of the runs to compare (default: %(default)s)")
    parser.add_argument(
        "--module", default="attn.q_proj", help="which adapted projection to inspect (default: %(default)s)"
    )
    parser.add_argument("--layer", type=int, default=-1, help="which block (default: the last)")
    parser.add_argument("--seeds", default="1337,2", help="two seeds of the r=64 run (default: %(default)s)")
    parser.add_argument(
        "--init_from", default="tiny", help="the base the adapters were trained on (default: %(default)s)"
    )
    parser.add_argument("--out", default="experiments/results/subspace.png")
    args = parser.parse_args(argv)
    seed_a, seed_b = (int(s) for s in args.seeds.split(","))

    base, _ = load_base_model(args.init_from)
    layer_index = args.layer % base.config.n_layer
    layer = f"transformer.h.{layer_index}.{args.module}"
    W = base.get_submodule(layer).weight.detach()
    (t8, _), (t64, _) = (
        load_run(args.runs_dir, args.task, 8, args.targets, seed_a),
        load_run(args.runs_dir, args.task, 64, args.targets, seed_a),
    )
    t64b, _ = load_run(args.runs_dir, args.task, 64, args.targets, seed_b)

    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    image, grid = heat_map(
        axes[0],
        t8[f"{layer}.lora_A.weight"],
        t64[f"{layer}.lora_A.weight"],
        8,
        64,
        f"phi(A_r=8, A_r=64, i, j), {layer}",
    )
    _, seeds = heat_map(
        axes[1],
        t64[f"{layer}.lora_A.weight"],
        t64b[f"{layer}.lora_A.weight"],
        64,
        64,
        f"phi(A_r=64 seed {seed_a}, A_r=64 seed {seed_b}, i, j)",
    )
    fig.colorbar(image, ax=list(axes))
    save_figure_atomic(fig, args.out)
    print(f"wrote {args.out}")
    d = W.shape[1]
    print(
        f"phi(A8, A64, 1, 1) = {grid[0, 0]:.3f}; phi(A8, A64, 8, 8) = {grid[7, 7]:.3f}; random subspaces give ~j/d = {8 / d:.3f} at j=8"
    )
    print(
        f"two seeds at r=64: phi(1, 1) = {seeds[0, 0]:.3f}, phi(8, 8) = {seeds[7, 7]:.3f}, phi(64, 64) = {seeds[63, 63]:.3f} (random: {64 / d:.3f})"
    )

    g = torch.Generator().manual_seed(0)
    print(f"\nAmplification (§7.3) on {layer}; ||U^T W V^T||_F with U, V from:")
    print("| run rank | dW's top-r | W's top-r | random | ||W||_F | ||dW||_F | factor ||dW|| / ||U^T W V^T|| |")
    print("|---|---|---|---|---|---|---|")
    for rank in (4, 64):
        tensors, config = load_run(args.runs_dir, args.task, rank, args.targets, seed_a)
        a = amplification(W, stored_update(tensors, config, layer), rank, g)
        print(
            f"| {rank} | {a['along_dW']:.3f} | {a['along_W']:.3f} | {a['along_random']:.3f} | {a['norm_W']:.2f} | {a['norm_dW']:.3f} | {a['factor']:.1f} |"
        )


if __name__ == "__main__":
    main()
