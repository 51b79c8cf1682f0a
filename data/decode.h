// JPEG (libjpeg-turbo) and PNG (libpng) decoding to 8-bit pixels. Torch-free: the loader's
// threads call it concurrently (every call owns its decoder state).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace shardtune::data {

// Row-major height x width x channels bytes.
struct Image {
  int height = 0, width = 0, channels = 0;
  std::vector<uint8_t> pixels;
};

// A file that does not decode: "PATH: the decoder's message". data.bad_images=skip catches it.
struct DecodeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Decodes `bytes` (JPEG or PNG, told apart by their signature, not the name) into `channels`
// (1 or 3) channels: alpha dropped, palettes expanded, 16-bit reduced to the high byte (as
// PIL does), colour to grey by ITU-R 601 luma L = (19595 R + 38470 G + 7471 B + 2^15) >> 16
// (PIL's convert("L")), grey to colour by repeating it. Warnings of the decoder (a truncated
// JPEG libjpeg would pad with grey) are errors: never a silently wrong image.
Image decode_image(const std::vector<uint8_t>& bytes, const std::string& name, int channels);
// Reads and decodes a file; a missing or unreadable file is a DecodeError too.
Image decode_file(const std::string& path, int channels);

// Lossless PNG of an 8-bit grey (1), RGB (3) or RGBA (4) image; for tests and the test kit.
std::vector<uint8_t> encode_png(const Image& img);
void write_file(const std::string& path, const std::vector<uint8_t>& bytes);

}  // namespace shardtune::data
