// glibc_compat_shim.cc — five symbols that ml-metadata 1.21 and
// tensorflow-data-validation 1.21 (built for manylinux_2_39: glibc 2.39, GCC 13+
// libstdc++) import but glibc < 2.38 / libstdc++ < GCC 13 do not define.
//
// Linked into the two extension modules by scripts/compat/glibc_compat.py, only on
// hosts with glibc < 2.39. Each symbol does what the newer runtime does:
//   __isoc23_strto{l,ll,ul,ull}  C23 strto*: the classic function, plus a 0b/0B
//                                binary prefix when base is 0 or 2 (glibc 2.38).
//   __cxa_call_terminate         begin the catch of the in-flight exception, then
//                                std::terminate (GCC 14 libsupc++).
//   std::ios_base_library_init() construct a static std::ios_base::Init so the
//                                standard streams exist (GCC 13 libstdc++).
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <exception>
#include <ios>

extern "C" void* __cxa_begin_catch(void*) noexcept;

namespace {

// If `s` (after blanks and an optional sign) is "0b" followed by a binary digit and
// the base allows it, parse the binary digits: returns true and sets *out/*end.
// On overflow *out is max_mag, *overflow is set and errno is ERANGE.
template <typename U>
bool parse_binary(const char* s, char** end, int base, U max_mag, U* out,
                  bool* negative, bool* overflow) {
  if (base != 0 && base != 2) return false;
  const char* p = s;
  while (std::isspace(static_cast<unsigned char>(*p))) ++p;
  bool neg = false;
  if (*p == '+' || *p == '-') { neg = (*p == '-'); ++p; }
  if (p[0] != '0' || (p[1] != 'b' && p[1] != 'B') || (p[2] != '0' && p[2] != '1'))
    return false;
  p += 2;
  U value = 0;
  bool over = false;
  for (; *p == '0' || *p == '1'; ++p) {
    U digit = static_cast<U>(*p - '0');
    if (value > (max_mag - digit) / 2) over = true;
    else value = value * 2 + digit;
  }
  if (end) *end = const_cast<char*>(p);
  if (over) { errno = ERANGE; value = max_mag; }
  *out = value;
  *negative = neg;
  *overflow = over;
  return true;
}

}  // namespace

extern "C" {

long __isoc23_strtol(const char* s, char** end, int base) {
  unsigned long mag; bool neg, over;
  if (!parse_binary<unsigned long>(s, end, base, static_cast<unsigned long>(LONG_MAX) + 1UL,
                                   &mag, &neg, &over))
    return std::strtol(s, end, base);
  if (!neg && mag > static_cast<unsigned long>(LONG_MAX)) { errno = ERANGE; return LONG_MAX; }
  return neg ? static_cast<long>(0UL - mag) : static_cast<long>(mag);
}

long long __isoc23_strtoll(const char* s, char** end, int base) {
  unsigned long long mag; bool neg, over;
  if (!parse_binary<unsigned long long>(s, end, base,
                                        static_cast<unsigned long long>(LLONG_MAX) + 1ULL,
                                        &mag, &neg, &over))
    return std::strtoll(s, end, base);
  if (!neg && mag > static_cast<unsigned long long>(LLONG_MAX)) { errno = ERANGE; return LLONG_MAX; }
  return neg ? static_cast<long long>(0ULL - mag) : static_cast<long long>(mag);
}

unsigned long __isoc23_strtoul(const char* s, char** end, int base) {
  unsigned long mag; bool neg, over;
  if (!parse_binary<unsigned long>(s, end, base, ULONG_MAX, &mag, &neg, &over))
    return std::strtoul(s, end, base);
  if (over) return ULONG_MAX;
  return neg ? 0UL - mag : mag;  // strtoul negates in the unsigned type
}

unsigned long long __isoc23_strtoull(const char* s, char** end, int base) {
  unsigned long long mag; bool neg, over;
  if (!parse_binary<unsigned long long>(s, end, base, ULLONG_MAX, &mag, &neg, &over))
    return std::strtoull(s, end, base);
  if (over) return ULLONG_MAX;
  return neg ? 0ULL - mag : mag;
}

[[noreturn]] void __cxa_call_terminate(void* unwind_header) noexcept {
  if (unwind_header) __cxa_begin_catch(unwind_header);
  std::terminate();
}

}  // extern "C"

namespace std {
void ios_base_library_init() { static ios_base::Init init; }
}  // namespace std
