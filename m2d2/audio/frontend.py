"""Log-mel front end: waveform [B, S] at 16 kHz -> natural-log mel power [B, 80, T].

The settings reproduce the reference M2D front end (nnAudio there, torchaudio here): periodic Hann window,
reflect-padded centred frames, power spectrum, Slaney mel scale with Slaney area normalisation, then
``log(mel + float32 eps)``. tests/unit/test_audio.py checks the result against a float64 NumPy implementation of
those formulas (max |difference| <= 1e-3; measured <= 3e-4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchaudio
from torch import nn

__all__ = ["LogMelConfig", "LogMelSpectrogram"]

#: Added to the mel power before the log, as in the reference (``torch.finfo(torch.float32).eps``).
LOG_EPS: float = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class LogMelConfig:
    """Front-end settings of the 16 kHz M2D / M2D2 models (paper and reference code).

    A hop of 160 samples gives 100 frames/s, so 10 s of audio is 1001 frames and 6.08 s is 609 frames. Change
    these only together with a model trained on the new features.
    """

    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    f_min: float = 50.0
    f_max: float = 8000.0

    def __post_init__(self) -> None:
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"win_length must be in (0, n_fft={self.n_fft}], got {self.win_length}")
        if self.hop_length <= 0 or self.n_mels <= 0 or self.sample_rate <= 0:
            raise ValueError("sample_rate, hop_length and n_mels must be positive")
        if not 0.0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(
                f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={self.f_min}, f_max={self.f_max}, "
                f"sample_rate={self.sample_rate}"
            )

    @property
    def min_samples(self) -> int:
        """Shortest waveform reflect padding accepts: the pad (n_fft // 2) must be shorter than the input."""
        return self.n_fft // 2 + 1

    def frames_for(self, num_samples: int) -> int:
        """Number of frames for ``num_samples`` samples with centred frames: ``1 + S // hop``."""
        return 1 + int(num_samples) // self.hop_length


def periodic_hann(length: int) -> torch.Tensor:
    """Periodic Hann window (``0.5 - 0.5 cos(2 pi n / N)``) evaluated in float64, stored as float32.

    ``torch.hann_window`` in float32 is off by up to 2.5e-7 (1e-4 relative on the near-zero edge taps, where
    ``0.5 - 0.5 cos`` cancels); rounding the float64 values keeps every tap within half a float32 ulp. With
    full-scale input that difference alone moved eps-floor mel bins by ~5e-4 in the log domain.
    """
    return torch.hann_window(length, periodic=True, dtype=torch.float64).to(torch.float32)


class LogMelSpectrogram(nn.Module):
    """Waveform -> float32 log-mel, whatever the input dtype and despite autocast, TF32 or ``model.half()``.

    Precision: the STFT power and the mel projection run in float64 and only the result is rounded to float32.
    A float32 FFT has a round-off floor about 140 dB below the frame energy; for full-scale narrow-band input
    (a 0 dBFS chirp) some mel bins sit at that floor, next to the ``eps`` of the log, and a float32 pipeline
    then misses the exact log-mel by up to ~1.1e-3 (measured on 0 dBFS tones and chirps). With the float64 STFT
    the front end stays within ~3e-4 of a float64 reference (tests/unit/test_audio.py); what is left comes mostly
    from torchaudio building the filterbank in float32. The cost (~2.5x a float32 STFT on CPU) is negligible next
    to the encoder, and float64 also keeps the mel matmul out of TF32.

    Buffers: torchaudio registers the STFT window and the mel filterbank (``fb``, stored [n_freqs, n_mels] =
    [201, 80]) as ordinary, persistent buffers, so they would land in every model checkpoint. They are
    re-registered here as *non-persistent*: they are pure functions of :class:`LogMelConfig`, and a checkpoint
    should carry the config, not 16k floats that could silently disagree with it. They still follow
    ``.to(device)``, but never change dtype (see :meth:`_apply`).
    """

    def __init__(self, config: LogMelConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else LogMelConfig()
        self.melspec = self._build_torchaudio(self.config)
        self.requires_grad_(False)

    @staticmethod
    def _build_torchaudio(c: LogMelConfig) -> torchaudio.transforms.MelSpectrogram:
        melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=c.sample_rate,
            n_fft=c.n_fft,
            win_length=c.win_length,
            hop_length=c.hop_length,
            f_min=c.f_min,
            f_max=c.f_max,
            n_mels=c.n_mels,
            window_fn=periodic_hann,
            power=2.0,
            normalized=False,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        )
        for module in melspec.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                del module._buffers[name]
                module.register_buffer(name, buf, persistent=False)
        return melspec

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LogMelSpectrogram:
        """Follow device moves, but rebuild the window and filterbank if a cast (``.half()``, DeepSpeed bf16) hit them.

        A bf16 filterbank alone would put ~4e-3 of error into the log-mel.
        """
        super()._apply(fn, recurse)
        if self.window.dtype != torch.float32 or self.mel_filters.dtype != torch.float32:
            device = self.window.device
            self.melspec = self._build_torchaudio(self.config).to(device)
            self.requires_grad_(False)
        return self

    @property
    def window(self) -> torch.Tensor:
        """The STFT window actually applied (length win_length, float32)."""
        return self.melspec.spectrogram.window

    @property
    def mel_filters(self) -> torch.Tensor:
        """The mel filterbank as torchaudio stores it: [n_fft // 2 + 1, n_mels], float32."""
        return self.melspec.mel_scale.fb

    def frames_for(self, num_samples: int) -> int:
        """Number of output frames for a waveform of ``num_samples`` samples (``1 + S // hop``)."""
        return self.config.frames_for(num_samples)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, n_mels, T] or [S] -> [n_mels, T], float32, with T = 1 + S // hop."""
        if wave.ndim not in (1, 2):
            raise ValueError(f"expected a waveform of shape [S] or [B, S], got {tuple(wave.shape)}")
        if not wave.is_floating_point():
            raise TypeError(f"expected a floating-point waveform in [-1, 1], got dtype {wave.dtype}")
        num_samples = wave.shape[-1]
        if num_samples < self.config.min_samples:
            raise ValueError(
                f"waveform has {num_samples} samples; the log-mel front end needs at least "
                f"{self.config.min_samples} (reflect padding of n_fft // 2 = {self.config.n_fft // 2}). "
                "Pad the waveform (e.g. with zeros) before calling it."
            )
        c = self.config
        # MPS has no float64; there the front end falls back to float32 (up to ~1.1e-3 off at the eps floor).
        wide = torch.float32 if wave.device.type == "mps" else torch.float64
        with torch.autocast(device_type=wave.device.type, enabled=False):
            # Round to float32 first so the result does not depend on the input dtype, then widen.
            x = wave.to(torch.float32).to(wide)
            power = torchaudio.functional.spectrogram(
                x,
                pad=0,
                window=self.window.to(wide),
                n_fft=c.n_fft,
                hop_length=c.hop_length,
                win_length=c.win_length,
                power=2.0,
                normalized=False,
                center=True,
                pad_mode="reflect",
                onesided=True,
            )  # [..., n_freqs, T]
            mel = torch.matmul(power.transpose(-1, -2), self.mel_filters.to(wide)).transpose(-1, -2)
            return torch.log(mel + LOG_EPS).to(torch.float32)
