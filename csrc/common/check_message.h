// The bindings' input checks: KDFAST_CHECK(condition, parts...) raises as TORCH_CHECK does, with a message built
// here from text, numbers (std::to_string), shapes, dtypes and devices. Why not TORCH_CHECK's own message: on an
// H200 host (torch 2.11, 2026-12-04) every failing check whose message streamed an integer or a shape into
// TORCH_CHECK's std::ostringstream segfaulted in this extension, while messages of text alone raised; a message
// handed over whole never streams a number.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace kdfast {

inline void append_text(std::string& out, const char* text) { out += text; }
inline void append_text(std::string& out, const std::string& text) { out += text; }
inline void append_text(std::string& out, c10::ScalarType dtype) { out += c10::toString(dtype); }
inline void append_text(std::string& out, c10::DeviceType device_type) {
  out += c10::DeviceTypeName(device_type, /*lower_case=*/true);
}
inline void append_text(std::string& out, const c10::Device& device) { out += device.str(); }
inline void append_text(std::string& out, c10::IntArrayRef dims) {  // "[7, 3]", as torch prints a shape
  out += "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  out += "]";
}
template <typename Number, std::enable_if_t<std::is_arithmetic_v<Number>, int> = 0>
inline void append_text(std::string& out, Number number) {
  out += std::to_string(number);
}

template <typename... Parts>
std::string describe(const Parts&... parts) {
  std::string out;
  (append_text(out, parts), ...);
  return out;
}

}  // namespace kdfast

// The message is built only when the check fails (TORCH_CHECK evaluates it lazily).
#define KDFAST_CHECK(condition, ...) TORCH_CHECK(condition, ::kdfast::describe(__VA_ARGS__))
