"""The IPA modules shipped with ipad, run by the Python worker host.

Each module is named by a manifest in ``workers/modules/<name>.toml`` whose
``entry_point`` points into this package: ``awb`` (grey-world white balance),
``agc`` (mean-luminance exposure) and ``echo`` (diagnostics for health checks
and benchmarks). Code here imports only the standard library, attrs and
``ipad.ipa`` so that a worker starts fast.
"""
