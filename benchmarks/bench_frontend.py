"""Front-end throughput: m2d2's log-mel (float64 STFT inside) vs a plain float32 torchaudio pipeline.

Prints seconds of audio processed per second of compute and the ratio, both measured here in one process.
The float64 STFT keeps the log-mel within 3e-4 of an exact reference (float32 misses by up to 1.15e-3 on
full-scale tones, see tests/unit/test_audio.py); this shows what that accuracy costs.

    python benchmarks/bench_frontend.py [--seconds 10] [--batch 8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchaudio

from m2d2.audio import LogMelSpectrogram


def _plain_float32() -> torch.nn.Module:
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, win_length=400, hop_length=160,
                                               f_min=50, f_max=8000, n_mels=80, power=2.0, norm="slaney",
                                               mel_scale="slaney")

    class Plain(torch.nn.Module):
        def forward(self, wave: torch.Tensor) -> torch.Tensor:
            return torch.log(mel(wave) + torch.finfo(torch.float32).eps)

    return Plain()


def _rate(fn, wave: torch.Tensor, repeat: int) -> float:
    fn(wave)  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn(wave)
    elapsed = (time.perf_counter() - start) / repeat
    return wave.shape[0] * wave.shape[1] / 16000 / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    wave = 0.1 * torch.randn(args.batch, int(args.seconds * 16000), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = _rate(LogMelSpectrogram(), wave, args.repeat)
        plain = _rate(_plain_float32(), wave, args.repeat)
        diff = (LogMelSpectrogram()(wave) - _plain_float32()(wave)).abs().max().item()
    print(f"threads: {torch.get_num_threads()}, batch {args.batch} x {args.seconds:.0f} s")
    print(f"m2d2 LogMelSpectrogram (float64 STFT): {ours:10.0f} s of audio / s")
    print(f"plain float32 torchaudio:              {plain:10.0f} s of audio / s")
    print(f"ratio (m2d2 / plain): {ours / plain:.2f}x   max |log-mel difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
