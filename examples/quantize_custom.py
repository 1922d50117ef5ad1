import torch
from torch import nn
from sklearn.datasets import load_digits
import packptq

def block(c_in, c_out, stride):            # a model that is not in the zoo
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU())

torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(y)
net = nn.Sequential(block(1, 16, 1), block(16, 32, 2), block(32, 32, 1), block(32, 64, 2),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
opt = torch.optim.Adam(net.parameters(), 1e-2)
for step in range(300):                    # a quick FP training on 1,400 digits
    i = torch.randint(0, 1400, (64,))
    opt.zero_grad(); nn.functional.cross_entropy(net(x[i]), y[i]).backward(); opt.step()
net.eval()

qnet, report = packptq.quantize(net, x[:256], overrides=["quant=w4a4", "recon.iters=100"])
acc = lambda m: (m(x[1400:]).argmax(1) == y[1400:]).float().mean().item() * 100
print("blocks", report["blocks"], "packs", report["packs"], "split rule", report["family"])
print(f"FP top-1 {acc(net):.1f}%, W4A4 top-1 {acc(qnet):.1f}%, avg weight bits {report['w_bits_avg']:.3f}")
