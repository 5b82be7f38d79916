// The one policy for the environment switches the C++ reads (MIXTRAL_EXT_ATTN_PATH, MIXTRAL_EXT_DECODE_SPLITS, ...):
// unset or empty means the default; any other value must be one the switch accepts, else
// std::runtime_error naming the variable, the value and the accepted values. A typo must not quietly run the
// default path while the user believes they forced another (torch turns the exception into a RuntimeError).
// Torch-free and CUDA-free, so the kernel launchers and both bindings can include it; callers decide when to read
// (once per process, or per call for switches the tests change within one process).
#pragma once
#include <cerrno>
#include <cstdlib>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace mixtral::env {

// The index of the variable's value in `accepted` (accepted[0] is the default: unset or empty gives 0).
inline int choice(const char* name, std::initializer_list<const char*> accepted) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  std::string words;
  int i = 0;
  for (const char* a : accepted) {
    if (std::string(v) == a) return i;
    words += (i == 0 ? "" : i + 1 == static_cast<int>(accepted.size()) ? " or " : ", ") + std::string(a);
    ++i;
  }
  throw std::runtime_error(std::string(name) + " must be " + words + " (unset: " + *accepted.begin() +
                              "), got '" + v + "'");
}

// The variable as a decimal integer in [lo, hi]; `fallback` when unset or empty.
inline int integer(const char* name, int lo, int hi, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long n = std::strtol(v, &end, 10);
  if (end == v || *end != '\0' || errno == ERANGE || n < lo || n > hi)
    throw std::runtime_error(std::string(name) + " must be an integer from " + std::to_string(lo) + " to " +
                                std::to_string(hi) + " (or unset), got '" + v + "'");
  return static_cast<int>(n);
}

}  // namespace mixtral::env
