#include "data/decode.h"

#include <png.h>
#include <turbojpeg.h>

#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>

namespace shardtune::data {

namespace {

[[noreturn]] void fail(const std::string& name, const std::string& why) { throw DecodeError(name + ": " + why); }

// PIL's convert("L"): ITU-R 601-2 luma in 16-bit fixed point.
void rgb_to_grey(Image& img) {
  const size_t n = static_cast<size_t>(img.height) * static_cast<size_t>(img.width);
  std::vector<uint8_t> out(n);
  const uint8_t* p = img.pixels.data();
  for (size_t i = 0; i < n; ++i, p += 3)
    out[i] = static_cast<uint8_t>((19595u * p[0] + 38470u * p[1] + 7471u * p[2] + 0x8000u) >> 16);
  img.pixels.swap(out);
  img.channels = 1;
}

// --- JPEG ---------------------------------------------------------------------------------

Image decode_jpeg(const std::vector<uint8_t>& bytes, const std::string& name, int channels) {
  std::unique_ptr<void, int (*)(tjhandle)> tj(tjInitDecompress(), tjDestroy);
  if (!tj) fail(name, "cannot start the JPEG decoder");
  int w = 0, h = 0, subsamp = 0, colorspace = 0;
  auto* src = const_cast<unsigned char*>(bytes.data());
  if (tjDecompressHeader3(tj.get(), src, bytes.size(), &w, &h, &subsamp, &colorspace) != 0)
    fail(name, std::string("not a valid JPEG: ") + tjGetErrorStr2(tj.get()));
  if (w <= 0 || h <= 0) fail(name, "a JPEG of zero size");
  Image img;
  img.height = h, img.width = w;
  const bool cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
  // CMYK can only be decoded to CMYK: converted below as PIL does for Adobe's inverted files.
  const int pf = cmyk ? TJPF_CMYK : (channels == 1 && colorspace == TJCS_GRAY ? TJPF_GRAY : TJPF_RGB);
  img.channels = tjPixelSize[pf];
  img.pixels.resize(static_cast<size_t>(w) * static_cast<size_t>(h) * static_cast<size_t>(img.channels));
  if (tjDecompress2(tj.get(), src, bytes.size(), img.pixels.data(), w, 0, h, pf, TJFLAG_ACCURATEDCT | TJFLAG_STOPONWARNING) != 0)
    fail(name, std::string("corrupt JPEG: ") + tjGetErrorStr2(tj.get()));
  if (cmyk) {  // Adobe CMYK JPEGs store inverted ink: R = C' K' / 255 with C' = 255 - C ...
    std::vector<uint8_t> rgb(static_cast<size_t>(w) * static_cast<size_t>(h) * 3);
    for (size_t i = 0, n = rgb.size() / 3; i < n; ++i) {
      const uint8_t* q = &img.pixels[i * 4];
      for (int c = 0; c < 3; ++c) rgb[i * 3 + static_cast<size_t>(c)] = static_cast<uint8_t>((q[c] * q[3] + 127) / 255);
    }
    img.pixels.swap(rgb);
    img.channels = 3;
  }
  if (channels == 1 && img.channels == 3) rgb_to_grey(img);
  return img;
}

// --- PNG ----------------------------------------------------------------------------------

struct PngReadState {
  const std::vector<uint8_t>* bytes;
  size_t pos = 0;
  std::jmp_buf jump;
  char message[256] = "";
};

void png_error_fn(png_structp png, png_const_charp msg) {
  auto* st = static_cast<PngReadState*>(png_get_error_ptr(png));
  std::snprintf(st->message, sizeof(st->message), "%s", msg);
  std::longjmp(st->jump, 1);
}
void png_warning_fn(png_structp, png_const_charp) {}  // e.g. a bad iCCP profile: harmless to pixels

void png_read_fn(png_structp png, png_bytep out, png_size_t n) {
  auto* st = static_cast<PngReadState*>(png_get_io_ptr(png));
  if (st->pos + n > st->bytes->size()) png_error(png, "truncated PNG (the file ends inside the image data)");
  std::memcpy(out, st->bytes->data() + st->pos, n);
  st->pos += n;
}

// No C++ object with a destructor lives across the setjmp: the image is sized after the
// header and written through plain pointers; the error path frees libpng's state only.
bool decode_png_into(PngReadState& st, int channels, Image& img, std::vector<png_bytep>& rows) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &st, png_error_fn, png_warning_fn);
  if (!png) return std::snprintf(st.message, sizeof(st.message), "cannot start the PNG decoder"), false;
  png_infop info = png_create_info_struct(png);
  if (!info || setjmp(st.jump)) {
    png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    return false;
  }
  png_set_read_fn(png, &st, png_read_fn);
  png_read_info(png, info);
  png_uint_32 w = 0, h = 0;
  int depth = 0, color = 0;
  png_get_IHDR(png, info, &w, &h, &depth, &color, nullptr, nullptr, nullptr);
  if (depth == 16) png_set_strip_16(png);  // the high byte, as PIL's 8-bit conversion
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if ((color & PNG_COLOR_MASK_COLOR) == 0 && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (color & PNG_COLOR_MASK_ALPHA) png_set_strip_alpha(png);
  const bool colour = (color & PNG_COLOR_MASK_COLOR) || color == PNG_COLOR_TYPE_PALETTE;
  if (!colour && channels == 3) png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  img.width = static_cast<int>(w), img.height = static_cast<int>(h);
  img.channels = static_cast<int>(png_get_channels(png, info));
  if (png_get_rowbytes(png, info) != static_cast<size_t>(w) * static_cast<size_t>(img.channels))
    png_error(png, "unexpected row size after conversion");
  // The buffers belong to the caller, so a longjmp from png_read_image leaks nothing.
  img.pixels.resize(static_cast<size_t>(w) * h * static_cast<size_t>(img.channels));
  rows.resize(h);
  for (png_uint_32 y = 0; y < h; ++y) rows[y] = img.pixels.data() + static_cast<size_t>(y) * w * static_cast<size_t>(img.channels);
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return true;
}

Image decode_png(const std::vector<uint8_t>& bytes, const std::string& name, int channels) {
  PngReadState st;
  st.bytes = &bytes;
  Image img;
  std::vector<png_bytep> rows;
  if (!decode_png_into(st, channels, img, rows)) fail(name, std::string("corrupt PNG: ") + st.message);
  if (img.width <= 0 || img.height <= 0) fail(name, "a PNG of zero size");
  if (channels == 1 && img.channels == 3) rgb_to_grey(img);
  return img;
}

}  // namespace

Image decode_image(const std::vector<uint8_t>& bytes, const std::string& name, int channels) {
  if (channels != 1 && channels != 3)
    throw std::invalid_argument("model.in_chans=" + std::to_string(channels) + ": images decode to 1 or 3 channels");
  if (bytes.empty()) fail(name, "an empty file, not an image");
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (bytes.size() >= 8 && std::memcmp(bytes.data(), kPng, 8) == 0) return decode_png(bytes, name, channels);
  if (bytes.size() >= 3 && bytes[0] == 0xff && bytes[1] == 0xd8 && bytes[2] == 0xff) return decode_jpeg(bytes, name, channels);
  fail(name, "not a JPEG or PNG file (unknown signature)");
}

Image decode_file(const std::string& path, int channels) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, std::string("cannot open: ") + std::strerror(errno));
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail(path, "read error");
  return decode_image(bytes, path, channels);
}

// --- PNG writing --------------------------------------------------------------------------

namespace {
void png_write_fn(png_structp png, png_bytep data, png_size_t n) {
  auto* out = static_cast<std::vector<uint8_t>*>(png_get_io_ptr(png));
  out->insert(out->end(), data, data + n);
}
void png_flush_fn(png_structp) {}
}  // namespace

std::vector<uint8_t> encode_png(const Image& img) {
  const int color = img.channels == 1 ? PNG_COLOR_TYPE_GRAY : img.channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_RGBA;
  if (img.channels != 1 && img.channels != 3 && img.channels != 4) throw std::invalid_argument("encode_png: 1, 3 or 4 channels");
  std::vector<uint8_t> out;
  PngReadState st;  // for the error message and jump only
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &st, png_error_fn, png_warning_fn);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  std::vector<png_bytep> rows(static_cast<size_t>(img.height));
  if (!info || setjmp(st.jump)) {
    png_destroy_write_struct(&png, info ? &info : nullptr);
    throw std::runtime_error(std::string("encode_png: ") + st.message);
  }
  png_set_write_fn(png, &out, png_write_fn, png_flush_fn);
  png_set_IHDR(png, info, static_cast<png_uint_32>(img.width), static_cast<png_uint_32>(img.height), 8, color,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  for (int y = 0; y < img.height; ++y)
    rows[static_cast<size_t>(y)] = const_cast<png_bytep>(img.pixels.data()) + static_cast<size_t>(y) * img.width * img.channels;
  png_write_info(png, info);
  png_write_image(png, rows.data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return out;
}

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error(path + ": cannot write: " + std::strerror(errno));
}

}  // namespace shardtune::data
