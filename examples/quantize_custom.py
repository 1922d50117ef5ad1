"""Bring your own model: quantize a CNN that is not in the zoo, save it, load it onto a fresh
instance of its class, export it as ONNX (QDQ) and run that in onnxruntime.

    python examples/quantize_custom.py

One torch thread and fixed seeds: every run prints the numbers README.md shows (the test suite
checks that it does)."""
import tempfile

import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

import packptq


class Net(nn.Sequential):  # a model that is not in the zoo
    def __init__(self):
        def block(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU())

        super().__init__(block(1, 16, 1), block(16, 32, 2), block(32, 32, 1), block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


torch.set_num_threads(1)  # float sums in another order on more threads: other last digits
torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(y)
net = Net()
opt = torch.optim.Adam(net.parameters(), 1e-2)
for step in range(300):  # a quick FP training on 1,400 digits
    i = torch.randint(0, 1400, (64,))
    opt.zero_grad()
    nn.functional.cross_entropy(net(x[i]), y[i]).backward()
    opt.step()
net.eval()

# calib_data: a tensor, (x, y), a Dataset or a DataLoader
qnet, report = packptq.quantize(net, x[:256], overrides=["quant=w4a4", "recon.iters=100"])
test = x[1400:]


@torch.no_grad()
def acc(logits):
    return (logits.argmax(1) == y[1400:]).float().mean().item() * 100


with torch.no_grad():
    q_logits = qnet(test)
print("blocks", report["blocks"], "packs", report["packs"], "split rule", report["family"])
print(f"FP top-1 {acc(net(test)):.1f}%, W4A4 top-1 {acc(q_logits):.1f}%, avg weight bits {report['w_bits_avg']:.3f}")

out = tempfile.mkdtemp()
path = packptq.save_quantized(qnet, f"{out}/net.pt")  # integer codes, scales, quantizer state
loaded = packptq.load_quantized(path, model=Net())  # onto a fresh instance of the class
with torch.no_grad():
    diff = (loaded(test) - q_logits).abs().max().item()
print(f"load_quantized(model=Net()): max abs logit difference {diff:g}")

onnx_path = packptq.export_onnx(qnet, f"{out}/net.onnx", x[:1])  # QuantizeLinear/DequantizeLinear
sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
ort_logits = torch.from_numpy(sess.run(None, {"input": test.numpy()})[0])
agree = (ort_logits.argmax(1) == q_logits.argmax(1)).float().mean().item() * 100
print(f"onnxruntime: top-1 {acc(ort_logits):.1f}%, agreement with the quantized module {agree:.1f}%")
print(f"files: net.pt {path.stat().st_size} bytes, net.onnx {onnx_path.stat().st_size} bytes, "
      f"FP float32 weights {sum(v.numel() * 4 for v in net.state_dict().values() if v.is_floating_point())} bytes")
