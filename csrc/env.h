// Boolean switches read from the environment at every call (RESODE_PERSISTENT_MLP,
// RESODE_CUDA_GRAPHS): on unless set to 0, false, no or off (any case).
#pragma once

#include <cctype>
#include <cstdlib>
#include <string>

namespace resode {

inline bool env_switch_on(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return true;
  std::string s(v);
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return !(s == "0" || s == "false" || s == "no" || s == "off");
}

}  // namespace resode
