"""Your own model, end to end: a transformers ResNet (small config, random init) trained on the digits
upsampled to 32x32 -> pruned to half its channels -> distilled from the full model -> int8 -> signed
package -> installed in a running agent -> served over its HTTP API.

    python examples/byom_end_to_end.py            # ~1,400 training images, a few minutes on 2 cores
    python examples/byom_end_to_end.py --quick    # a smoke run (tests/test_byom_example.py runs a reduced one)

The user code is everything between the markers below (tests/test_byom_example.py checks it stays under 40
lines); the command-line wrapper after it only picks a folder and prints the result."""

# --- user code -------------------------------------------------------------------------------------------
import numpy as np
import torch
from sklearn.datasets import load_digits
from transformers import ResNetConfig, ResNetForImageClassification

import compress
import export
from edge_agent import Agent, AgentConfig, Client


class Net(torch.nn.Module):  # the transformers model, returning its logits tensor
    def __init__(self) -> None:
        super().__init__()
        self.model = ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=16, num_labels=10,
                                                  hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1], layer_type="basic"))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image).logits


def main(out, epochs: int = 12, rows: int | None = None) -> dict:
    x, y = load_digits(return_X_y=True)
    x = torch.nn.functional.interpolate(torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16, size=32,
                                        mode="bilinear").numpy()
    idx = np.random.default_rng(0).permutation(len(x))[:rows]
    n = len(idx) * 4 // 5
    train, test = (x[idx[:n]], y[idx[:n]]), (x[idx[n:]], y[idx[n:]])
    torch.manual_seed(0)
    teacher = compress.distill(Net(), None, compress.DistillConfig(epochs=epochs, lr=3e-3, shift=2), train)
    student = compress.prune(teacher, compress.PruneConfig(ratio=0.5, ignore=["model.resnet.embedder"]), train[0][:8])
    compress.distill(student, teacher, compress.DistillConfig(epochs=epochs, lr=2e-3, shift=2), train)
    keys = export.generate_keys(out / "keys")
    result = compress.quantize(student, compress.QuantConfig(mode="static", formats=["onnx"]), train[0][:256], out / "q",
                               eval_data=test, metric="top1", key=keys["private_key"], name="digits-resnet", device="raspberry-pi-4",
                               input_names=["image"], output_names=["logits"])
    agent = Agent(AgentConfig(state_dir=str(out / "agent"), trust=keys["public_key"], listen="127.0.0.1:0",
                              max_batch=len(test[0]))).start()
    agent.install(result.artifacts[0].package)
    with Client(agent.urls()[0]) as client:
        served = client.predict({"image": test[0]}, model="digits-resnet")
    agent.stop()
    return {"fp32_top1": result.baseline["metric"]["value"], "int8_top1": result.artifacts[0].metric["value"],
            "served_top1": float((served.outputs["logits"].argmax(1) == test[1]).mean()), "served": served.model,
            "package": str(result.artifacts[0].package), "params": [sum(p.numel() for p in m.parameters())
                                                                   for m in (teacher, student)]}
# --- end of user code ------------------------------------------------------------------------------------


if __name__ == "__main__":
    import argparse
    import tempfile
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 epochs on 400 images (a smoke run)")
    p.add_argument("--out", type=Path, default=None, help="where packages, keys and the agent state go")
    args = p.parse_args()
    report = main(args.out or Path(tempfile.mkdtemp(prefix="pf-byom-")), *((2, 400) if args.quick else ()))
    print("\n".join(f"{k:12} {v}" for k, v in report.items()))
    print(f"int8 is {100 * (report['fp32_top1'] - report['int8_top1']):+.2f} pt below its fp32 top-1 (goal: within 0.5)")
