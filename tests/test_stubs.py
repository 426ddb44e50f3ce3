"""Another language's stubs from a description: examples/stubs/describe_to_c.py, proven in C.

The header it makes from ``ipadctl describe MODULE --json`` is compiled with
the system compiler, strictly; a C program fills the generated structs and
writes each call's args with the generated functions; those bytes, decoded,
are sent to the real modules, which accept them and answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ipad.client import BlockingClient, make_buffer
from tests.client_drivers import Start
from tests.daemon_process import REPO, write_config

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler"),
]

STUBS = REPO / "examples" / "stubs"
COMPILER = shutil.which("cc") or "cc"

PROGRAM = r"""
#include <stdio.h>
#include "awb_stubs.h"
#include "agc_stubs.h"
#include "echo_stubs.h"

static void emit(const char *name, ipad_writer *w) {
    printf("%s ", name);
    for (size_t i = 0; i < w->used; i++) printf("%02x", w->data[i]);
    printf(" %d\n", w->overflow);
    w->used = 0;
}

int main(void) {
    uint8_t space[4096];
    ipad_writer w = {space, sizeof space, 0, false};
    awb_SensorLimits limits = {.min_exposure_us = 100, .max_exposure_us = 30000,
                               .min_gain = 1.0, .max_gain = 16.0};
    awb_SensorInfo info = {.model = "imx219", .width = 1920, .height = 1080, .limits = &limits};
    awb_configure_args(&w, &info);
    emit(AWB_CONFIGURE_METHOD, &w);
    awb_AwbSettings settings = {.initial_red_gain = 2.0, .has_initial_red_gain = true};
    awb_init_args(&w, &settings);
    emit(AWB_INIT_METHOD, &w);
    awb_process_stats_args(&w, 7);
    emit(AWB_PROCESS_STATS_METHOD, &w);
    printf("fd_args %s\n", awb_process_stats_fd_args[0]);
    agc_SensorLimits agc_limits = {100, 30000, 1.0, 16.0};
    agc_SensorInfo agc_info = {.model = "ov5647", .width = 640, .height = 480,
                               .limits = &agc_limits};
    agc_configure_args(&w, &agc_info);
    emit(AGC_CONFIGURE_METHOD, &w);
    agc_process_stats_args(&w, 3, 1000, 2.0);
    emit(AGC_PROCESS_STATS_METHOD, &w);
    echo_echo_args(&w, "from C");
    emit(ECHO_ECHO_METHOD, &w);
    double seconds = 0.0;
    echo_sleep_args(&w, seconds);
    emit(ECHO_SLEEP_METHOD, &w);
    return 0;
}
"""


def test_a_c_header_generated_from_describe_makes_calls_the_modules_accept(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Output of describe --json -> header -> cc -Werror -> C writes args -> the real workers answer."""
    daemon = start_daemon(write_config(tmp_path))
    for module in ("awb", "agc", "echo"):
        described = daemon.ctl("describe", module, "--json").stdout
        header = subprocess.run(
            [sys.executable, str(STUBS / "describe_to_c.py")], input=described,
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        (tmp_path / f"{module}_stubs.h").write_text(header)
    (tmp_path / "main.c").write_text(PROGRAM)
    binary = tmp_path / "stubs"
    compiled = subprocess.run(
        [COMPILER, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(STUBS), "-I", str(tmp_path),
         "-o", str(binary), str(tmp_path / "main.c")],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr
    output = subprocess.run([str(binary)], capture_output=True, text=True, check=True, timeout=30)
    written: dict[str, list[Any]] = {}
    for line in output.stdout.splitlines():
        name, value, *overflow = line.split()
        if name == "fd_args":
            assert value == "stats"
            continue
        assert overflow == ["0"]
        written.setdefault(name, []).append(msgspec.msgpack.decode(bytes.fromhex(value)))
    sensor = {"model": "imx219", "width": 1920, "height": 1080,
              "limits": {"min_exposure_us": 100, "max_exposure_us": 30000, "min_gain": 1.0,
                         "max_gain": 16.0}}  # fmt: skip
    assert written["configure"][0] == {"sensor_info": sensor}
    assert written["init"] == [{"settings": {"initial_red_gain": 2.0}}]
    assert written["process_stats"][0] == {"frame": 7}
    assert written["echo"] == [{"text": "from C"}]
    with BlockingClient(daemon.socket) as client:
        awb = client.request_proxy("awb")
        assert awb.call("init", written["init"][0]) is None
        assert awb.call("configure", written["configure"][0]) is None
        zones = (b"\x00\x08\x00\x00" * 3 + b"\x0a\x00\x00\x00") * 4  # 2048 each, 10 pixels
        fd = make_buffer(zones)
        try:
            result = awb.call("process_stats", written["process_stats"][0], {"stats": fd})
        finally:
            os.close(fd)
        assert result.frame == 7
        assert result.zones_used == 4
        agc = client.request_proxy("agc")
        agc.call("configure", written["configure"][1])
        fd = make_buffer(b"\x01\x00\x00\x00" * 16)
        try:
            exposure = agc.call("process_stats", written["process_stats"][1], {"stats": fd})
        finally:
            os.close(fd)
        assert exposure.frame == 3
        echo = client.request_proxy("echo")
        assert echo.call("echo", written["echo"][0]).text == "from C"
        assert echo.call("sleep", written["sleep"][0]) == 0.0
