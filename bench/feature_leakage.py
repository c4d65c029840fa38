"""How much of each image do a device's uploaded features give away? An honest-but-curious server's
reconstruction attacks on FedGKT features, with and without the feature-privacy defence (docs/PRIVACY.md).

    python bench/feature_leakage.py --state out/quickstart/agents/dev0/state/agent_state.safetensors \\
        --setting none --setting clip=40 --setting clip=40,sigma=0.1 --setting clip=40,eps=8

Threat model: the server knows the extractor's weights (white box: it receives them with extractor averaging,
and it seeded the initial model of every run), the mechanism and its settings (but not the noise), the
labels of the uploaded samples, and holds a public split of the same distribution (Fashion-MNIST's test
split; the victims are a device's private training images). Per ``--setting`` it sees what a device
uploads: features of the extractor, clipped and noised as configured, through the run's feature codec.

Attacks (each reconstruction is compared with the victim image in [0, 1]: PSNR in dB and SSIM):
- ``learned``: an inverse network ((features, label) -> image) trained on the public split's features
  released through the same mechanism (fresh noise every epoch, so it learns to denoise);
- ``analytic``: the stem's exact inverse where it has one (conv + BatchNorm + ReLU, no pooling): least
  squares of the convolution on the active (positive) units, BatchNorm undone;
- ``class mean``: the baseline any server has from the labels alone: the public split's mean image of the
  victim's class. A defence that brings both attacks down to it leaves the features no more revealing
  than the label.

Prints a table, writes ``leakage.json`` and ``leakage.png`` (victims and reconstructions) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_sdk.privacy import privatize_features  # noqa: E402
from edgefl_core.codecs import decode_features, encode_features  # noqa: E402
from edgefl_core.data.datasets import dataset_stats, load_dataset  # noqa: E402
from model_zoo import create_model, seeded  # noqa: E402
from model_zoo.resnet_gkt import Stem  # noqa: E402
from bench.plots import save_figure  # noqa: E402


# -- the device's side: an extractor and what it releases --------------------------------------------------------

def build_extractor(args, train) -> nn.Module:
    """The quickstart's edge model: from a device's saved state (a real run), or trained here for
    ``--epochs`` on a device-sized shard with CE (a stand-in when no run is at hand)."""
    with seeded(args.seed):
        model = create_model(args.model, num_classes=10, in_channels=1, stem_stride=args.stem_stride)
    if args.state:
        from edge_sdk.state import read_state
        state = read_state(Path(args.state))
        if state is None:
            sys.exit(f"{args.state}: not a readable agent state file")
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state["model"].items()})
        print(f"extractor: {args.state} (device state after round {state.get('last_done')})")
        return model.eval()
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(len(train.images), args.train_samples, replace=False)
    x, y = to_input(train.images[rows], args), torch.from_numpy(train.labels[rows])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(args.epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x), 64):
            b = order[i:i + 64]
            logits, _ = model(x[b])
            loss = F.cross_entropy(logits, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"extractor: trained here, {args.epochs} epochs of CE on {args.train_samples} images (no --state)")
    return model.eval()


MEAN, STD = (np.array(s, dtype=np.float32) for s in dataset_stats("fashion_mnist"))


def to_input(images_u8: np.ndarray, args) -> torch.Tensor:
    x = torch.from_numpy(images_u8).float() / 255.0
    return (x - torch.from_numpy(MEAN).view(1, -1, 1, 1)) / torch.from_numpy(STD).view(1, -1, 1, 1)


@torch.no_grad()
def features_of(model: nn.Module, images_u8: np.ndarray, args) -> np.ndarray:
    return np.concatenate([model.forward_features(to_input(images_u8[i:i + 512], args)).numpy()
                           for i in range(0, len(images_u8), 512)])


def release(features: np.ndarray, setting: dict, codec: str, rng: np.random.Generator) -> np.ndarray:
    """What the server receives: the mechanism (clip + noise) then the feature codec's round trip."""
    out = privatize_features(features, setting.get("clip"), setting.get("sigma", 0.0), rng)
    return decode_features(encode_features(np.ascontiguousarray(out, dtype=np.float32), codec), codec)


# -- the attacks ---------------------------------------------------------------------------------------------------

class Inverse(nn.Module):
    """(features B x C x h x w, labels B) -> image (B x 1 x H x W) in [0, 1]; upsamples by ``scale``. The
    label (which the server receives with every sample) enters as one-hot planes: with features that carry
    nothing, the best this can learn is the class mean, the baseline."""

    def __init__(self, channels: int, scale: int, classes: int = 10, width: int = 64):
        super().__init__()
        self.classes = classes
        layers: list[nn.Module] = [nn.Conv2d(channels + classes, width, 3, padding=1), nn.ReLU()]
        for _ in range(int(np.log2(scale))):
            layers += [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(), nn.Conv2d(width // 2, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        planes = F.one_hot(labels, self.classes).float()[:, :, None, None].expand(-1, -1, *f.shape[2:])
        return torch.sigmoid(self.net(torch.cat([f, planes], 1)))


def learned_attack(public_feats: np.ndarray, public_u8: np.ndarray, public_labels: np.ndarray,
                   victim_feats: np.ndarray, victim_labels: np.ndarray, args) -> np.ndarray:
    """Train :class:`Inverse` on (released public features, label -> public image) and apply it to the
    victims' released features and labels. ``public_feats`` are raw (unreleased): each epoch releases them
    afresh."""
    scale = public_u8.shape[-1] // public_feats.shape[-1]
    with seeded(args.seed):
        net = Inverse(public_feats.shape[1], scale)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    target = torch.from_numpy(public_u8).float() / 255.0
    labels = torch.from_numpy(public_labels)
    rng = np.random.default_rng(args.seed + 1)
    for epoch in range(args.attack_epochs):
        x = torch.from_numpy(args.release(public_feats, rng))
        order = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x), 128):
            b = order[i:i + 128]
            loss = F.mse_loss(net(x[b], labels[b]), target[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return net(torch.from_numpy(victim_feats), torch.from_numpy(victim_labels)).numpy()[:, 0]


def analytic_attack(model: nn.Module, victim_feats: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray | None:
    """Invert conv + BN + ReLU: on the units a feature map shows as positive, BN is affine and the
    convolution linear, so the image is the least-squares solution of those equations. None when the
    extractor is not a plain stem (pooling or residual blocks have no such inverse)."""
    stem = model.stem
    if not isinstance(stem, Stem) or len(stem) != 3:
        return None
    conv, bn = stem[0], stem[1]
    c, h, w = shape
    with torch.no_grad():
        basis = torch.eye(c * h * w).view(-1, c, h, w)                            # (CHW) one-pixel images
        A = F.conv2d(basis, conv.weight, None, conv.stride, conv.padding).flatten(1).T.double()  # units x (CHW)
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
        shift = (bn.bias - bn.running_mean * scale).double()
    out_hw = A.shape[0] // len(scale)
    scale_u, shift_u = scale.repeat_interleave(out_hw), shift.repeat_interleave(out_hw)   # per unit
    images = []
    for f in torch.from_numpy(victim_feats).double().flatten(1):
        active = f > 1e-6
        z = (f[active] - shift_u[active]) / scale_u[active]                     # the conv's output on active units
        x = torch.linalg.lstsq(A[active], z.unsqueeze(1)).solution[:, 0]
        images.append(x.view(c, h, w).float())
    x = torch.stack(images) * torch.from_numpy(STD).view(1, -1, 1, 1) + torch.from_numpy(MEAN).view(1, -1, 1, 1)
    return x.clamp(0, 1).numpy()[:, 0]


# -- quality --------------------------------------------------------------------------------------------------------

def quality(recon: np.ndarray, truth: np.ndarray) -> dict:
    """Mean PSNR (dB) and SSIM (scikit-image, data range 1) of reconstructions vs the victims (N x H x W)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    psnr = [peak_signal_noise_ratio(t, r, data_range=1.0) for r, t in zip(recon, truth)]
    ssim = [structural_similarity(t, r, data_range=1.0) for r, t in zip(recon, truth)]
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}


def parse_setting(text: str, rounds: int, delta: float) -> dict:
    """``none`` | ``clip=C`` | ``clip=C,sigma=S`` | ``clip=C,eps=E`` (σ calibrated for ``rounds`` releases)."""
    setting: dict = {"name": text}
    if text == "none":
        return setting
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in ("clip", "sigma", "eps"):
            raise SystemExit(f"--setting {text!r}: unknown key {key!r} (clip, sigma, eps)")
        setting[key] = float(value)
    if "clip" not in setting:
        raise SystemExit(f"--setting {text!r}: noise needs clip=")
    if "eps" in setting:
        from cloud_runtime.privacy import calibrate_noise
        setting["sigma"] = calibrate_noise(setting["eps"], delta, rounds)
    if setting.get("sigma"):
        from cloud_runtime.privacy import epsilon
        setting["epsilon_run"] = epsilon(setting["sigma"], rounds, delta)
    return setting


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", help="a device's agent_state.safetensors from a run (default: train an extractor)")
    ap.add_argument("--setting", action="append", default=[], help="none | clip=C[,sigma=S | ,eps=E] (repeat)")
    ap.add_argument("--model", default="resnet8_gkt")
    ap.add_argument("--stem-stride", type=int, default=2)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--rounds", type=int, default=6, help="releases per sample for the ε column (the run's rounds)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--victims", type=int, default=500)
    ap.add_argument("--public", type=int, default=10000, help="public images the attacker trains on")
    ap.add_argument("--attack-epochs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2, help="without --state: epochs of the stand-in extractor")
    ap.add_argument("--train-samples", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-path", default=None)
    ap.add_argument("--out", default="docs/bench/feature_leakage")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = [parse_setting(s, args.rounds, args.delta) for s in (args.setting or ["none"])]

    train = load_dataset("fashion_mnist", "train", args.data_path)
    public = load_dataset("fashion_mnist", "test", args.data_path)
    model = build_extractor(args, train)
    rng = np.random.default_rng(args.seed + 7)
    victims = rng.choice(len(train.images), args.victims, replace=False)
    victim_u8, victim_labels = train.images[victims], train.labels[victims]
    truth = victim_u8[:, 0].astype(np.float32) / 255.0
    public_u8 = public.images[:args.public]
    public_feats, victim_raw = features_of(model, public_u8, args), features_of(model, victim_u8, args)
    norms = np.linalg.norm(victim_raw.reshape(len(victim_raw), -1), axis=1)
    print(f"features {victim_raw.shape[1:]} per image {victim_u8.shape[1:]}; L2 norm per sample: median "
          f"{np.median(norms):.1f}, 90th percentile {np.percentile(norms, 90):.1f}")

    class_mean = np.stack([public_u8[public.labels[:args.public] == k][:, 0].mean(0) / 255.0 for k in range(10)])
    baseline = quality(class_mean[victim_labels], truth)
    results = {"command": " ".join(sys.argv), "feature_norm_median": float(np.median(norms)),
               "class_mean": baseline, "settings": []}
    print(f"\n{'setting':<28}{'sigma':>8}{'eps(run)':>10}{'learned PSNR':>14}{'SSIM':>7}{'analytic PSNR':>15}"
          f"{'SSIM':>7}{'seconds':>9}")
    print(f"{'class mean (label only)':<28}{'':>8}{'':>10}{baseline['psnr']:>14.2f}{baseline['ssim']:>7.3f}")
    pictures = {"victim": truth[:8], "class mean": class_mean[victim_labels[:8]]}
    for setting in settings:
        t = time.time()
        args.release = lambda f, r, s=setting: release(f, s, args.codec, r)
        victim_feats = args.release(victim_raw, np.random.default_rng())  # the device's noise: unknown to the server
        learned = learned_attack(public_feats, public_u8, public.labels[:args.public], victim_feats, victim_labels,
                                 args)
        analytic = analytic_attack(model, victim_feats, victim_u8.shape[1:])
        row = {**setting, "learned": quality(learned, truth),
               "analytic": quality(analytic, truth) if analytic is not None else None,
               "seconds": time.time() - t}
        results["settings"].append(row)
        a = row["analytic"] or {"psnr": float("nan"), "ssim": float("nan")}
        print(f"{setting['name']:<28}{setting.get('sigma', 0):>8.3g}{setting.get('epsilon_run', float('inf')):>10.3g}"
              f"{row['learned']['psnr']:>14.2f}{row['learned']['ssim']:>7.3f}{a['psnr']:>15.2f}{a['ssim']:>7.3f}"
              f"{row['seconds']:>9.0f}")
        pictures[f"{setting['name']}: learned"] = learned[:8]
        if analytic is not None:
            pictures[f"{setting['name']}: analytic"] = analytic[:8]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "leakage.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    plot(pictures, out / "leakage.png")
    print(f"\nwrote {out / 'leakage.json'} and {out / 'leakage.png'}")
    return 0


def plot(pictures: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = len(pictures)
    fig, axes = plt.subplots(rows, 8, figsize=(8 * 1.1, rows * 1.2))
    for r, (name, images) in enumerate(pictures.items()):
        for c in range(8):
            ax = axes[r, c]
            ax.imshow(images[c], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("What the server can rebuild from uploaded features (Fashion-MNIST, quickstart extractor)",
                 fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
