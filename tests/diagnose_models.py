"""Models with a known loss for the diagnose tests: the exact posterior mean of a data set as a
TorchScript module, in any prediction and process coordinates (written here from the definitions, not
with lossfloor's conversions)."""

import torch


class PosteriorMean(torch.nn.Module):
    """forward(x, t) in `process` coordinates -> `prediction` of the exact posterior mean of `data`."""

    def __init__(self, data: torch.Tensor, prediction: str, process: str):
        super().__init__()
        self.register_buffer("X", data.flatten(1).to(torch.float64))  # (N, D)
        self.prediction = prediction
        self.process = process

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64).view(-1, 1)  # (B,) -> (B, 1)
        y = x.flatten(1).to(torch.float64)  # (B, D)
        if self.process == "ve":  # x = x0 + sigma eps, t = sigma
            sigma = t
        elif self.process == "vp":  # x = (x0 + sigma eps) / sqrt(1 + sigma^2), t = sigma
            sigma = t
            y = y * torch.sqrt(1 + sigma**2)
        else:  # fm: x = (1 - t) x0 + t eps, sigma = t / (1 - t)
            sigma = t / (1 - t)
            y = y / (1 - t)
        d2 = y.square().sum(1, keepdim=True) - 2 * y @ self.X.T + self.X.square().sum(1)  # (B, N), float64
        w = torch.softmax(-d2 / (2 * sigma**2), dim=1)
        m = w @ self.X  # E[x0 | y], (B, D)
        eps = (y - m) / sigma  # E[eps | y]
        if self.prediction == "x0":
            out = m
        elif self.prediction == "eps":
            out = eps
        elif self.prediction == "score":
            out = -eps / sigma
        elif self.prediction == "vp-v":  # a eps - s x0 with a = 1/sqrt(1+sigma^2), s = sigma a
            a = 1 / torch.sqrt(1 + sigma**2)
            out = a * eps - sigma * a * m
        else:  # fm-velocity: eps - x0
            out = eps - m
        return out.to(x.dtype).view(x.shape)


def save_oracle(data, prediction: str, process: str, path) -> str:
    torch.jit.save(torch.jit.script(PosteriorMean(torch.as_tensor(data), prediction, process)), str(path))
    return str(path)
