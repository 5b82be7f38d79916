"""The one policy for the MIXTRAL_EXT_* environment switches the C++ reads (csrc/kernels/env.h): unset or empty gives
the default, an accepted value its index / number, anything else an error naming the variable, the value and what is
accepted. env.h is torch- and CUDA-free, so it is compiled here with the host C++ compiler into a small driver and
run with each value; no GPU or extension build needed."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = r"""
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include "env.h"
int main(int argc, char** argv) {
  try {
    if (std::strcmp(argv[1], "choice") == 0)
      std::printf("%d\n", mixtral::env::choice("MIXTRAL_EXT_TEST_SWITCH", {"auto", "sm80", "sm90"}));
    else
      std::printf("%d\n", mixtral::env::integer("MIXTRAL_EXT_TEST_SWITCH", 1, 64, 7));
  } catch (const std::runtime_error& e) {
    std::printf("error: %s\n", e.what());
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("env_switch")
    (d / "driver.cpp").write_text(DRIVER)
    subprocess.run([cxx, "-std=c++17", "-O0", "-I", os.path.join(ROOT, "csrc", "kernels"), str(d / "driver.cpp"),
                    "-o", str(d / "driver")], check=True)

    def run(kind, value):
        env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_EXT_TEST_SWITCH"}
        if value is not None:
            env["MIXTRAL_EXT_TEST_SWITCH"] = value
        return subprocess.run([str(d / "driver"), kind], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
    return run


@pytest.mark.parametrize("value,expected", [(None, "0"), ("", "0"), ("auto", "0"), ("sm80", "1"), ("sm90", "2")])
def test_choice_accepted(driver, value, expected):
    assert driver("choice", value) == expected


@pytest.mark.parametrize("value", ["sm_90", "SM80", "sm80 ", "1"])
def test_choice_unknown_value_is_an_error_naming_the_variable_and_the_choices(driver, value):
    assert driver("choice", value) == (f"error: MIXTRAL_EXT_TEST_SWITCH must be auto, sm80 or sm90 (unset: auto), "
                                       f"got '{value}'")


@pytest.mark.parametrize("value,expected", [(None, "7"), ("", "7"), ("1", "1"), ("64", "64"), ("13", "13")])
def test_integer_accepted(driver, value, expected):
    assert driver("integer", value) == expected


@pytest.mark.parametrize("value", ["0", "65", "-3", "four", "4x", "99999999999999999999"])
def test_integer_garbage_or_out_of_range_is_an_error(driver, value):
    assert driver("integer", value) == (f"error: MIXTRAL_EXT_TEST_SWITCH must be an integer from 1 to 64 (or unset), "
                                        f"got '{value}'")
