// Added by hvdtrain's Horovod build: HMAC-SHA256 (RFC 2104, FIPS 180-4) signatures
// for the Gloo rendezvous HTTP requests. With HOROVOD_GLOO_RENDEZVOUS_SECRET set,
// every GET, PUT and DELETE carries
//   X-Hvdtrain-Signature: hex(HMAC-SHA256(secret, METHOD + " " + PATH + "\n" + BODY))
// so a rendezvous server that knows the job's secret refuses anyone else's requests.
// Without the variable nothing is added (horovodrun's own server ignores the header).
#ifndef HVDTRAIN_RENDEZVOUS_SIGNATURE_H
#define HVDTRAIN_RENDEZVOUS_SIGNATURE_H

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace horovod {
namespace common {
namespace rendezvous_signature {

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

inline std::string sha256(const std::string& message) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
      0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
      0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
      0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
      0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
      0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
      0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::vector<uint8_t> data(message.begin(), message.end());
  uint64_t bits = static_cast<uint64_t>(data.size()) * 8;
  data.push_back(0x80);
  while (data.size() % 64 != 56) data.push_back(0);
  for (int i = 7; i >= 0; --i) data.push_back(static_cast<uint8_t>(bits >> (8 * i)));
  for (size_t chunk = 0; chunk < data.size(); chunk += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = (uint32_t(data[chunk + 4 * i]) << 24) | (uint32_t(data[chunk + 4 * i + 1]) << 16) |
             (uint32_t(data[chunk + 4 * i + 2]) << 8) | uint32_t(data[chunk + 4 * i + 3]);
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
  std::string digest;
  for (uint32_t word : h) {
    for (int i = 3; i >= 0; --i) digest.push_back(static_cast<char>((word >> (8 * i)) & 0xff));
  }
  return digest;
}

inline std::string hmac_sha256_hex(const std::string& key, const std::string& message) {
  std::string block = key.size() > 64 ? sha256(key) : key;
  block.resize(64, '\0');
  std::string inner(64, '\0'), outer(64, '\0');
  for (int i = 0; i < 64; ++i) {
    inner[i] = static_cast<char>(block[i] ^ 0x36);
    outer[i] = static_cast<char>(block[i] ^ 0x5c);
  }
  std::string mac = sha256(outer + sha256(inner + message));
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned char byte : mac) {
    out.push_back(hex[byte >> 4]);
    out.push_back(hex[byte & 0xf]);
  }
  return out;
}

// The request's headers: the signature when the job has a secret, else none.
inline std::vector<std::string> headers(const std::string& method, const std::string& url,
                                        const std::string& body) {
  const char* secret = std::getenv("HOROVOD_GLOO_RENDEZVOUS_SECRET");
  if (secret == nullptr || *secret == '\0') return {};
  size_t scheme = url.find("://");
  size_t slash = url.find('/', scheme == std::string::npos ? 0 : scheme + 3);
  std::string path = slash == std::string::npos ? "/" : url.substr(slash);
  return {"X-Hvdtrain-Signature: " + hmac_sha256_hex(secret, method + " " + path + "\n" + body)};
}

}  // namespace rendezvous_signature
}  // namespace common
}  // namespace horovod

#endif  // HVDTRAIN_RENDEZVOUS_SIGNATURE_H
