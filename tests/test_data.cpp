// Image data: decoding, transforms, the file indexes, the loader's determinism, and that a
// lossless PNG folder of Fashion-MNIST images gives exactly the IDX path's tensors.
#include <gtest/gtest.h>
#include <png.h>
#include <turbojpeg.h>
#include <torch/torch.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>

#include "data/decode.h"
#include "data/imagefolder.h"
#include "data/transforms.h"
#include "io/idx.h"
#include "trainer/data.h"

using namespace shardtune;
namespace fs = std::filesystem;

namespace {

const std::string kFashion = "/usr/share/datasets/fashion-mnist";

fs::path scratch(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("shardtune_test_data_" + std::to_string(::getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

data::Image pattern(int h, int w, int c, int salt = 0) {
  data::Image im{h, w, c, std::vector<uint8_t>(static_cast<size_t>(h * w * c))};
  for (size_t i = 0; i < im.pixels.size(); ++i) im.pixels[i] = static_cast<uint8_t>((i * 37 + salt * 11 + i / 7) % 256);
  return im;
}

// A PNG libpng writes with any colour type and depth (palette, 16-bit, grey+alpha).
void write_png(const fs::path& path, int w, int h, int color, int depth, const std::vector<uint8_t>& raw,
               const std::vector<png_color>& palette = {}) {
  FILE* f = std::fopen(path.c_str(), "wb");
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  png_init_io(png, f);
  png_set_IHDR(png, info, w, h, depth, color, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (!palette.empty()) png_set_PLTE(png, info, palette.data(), static_cast<int>(palette.size()));
  png_write_info(png, info);
  const size_t row = raw.size() / static_cast<size_t>(h);
  for (int y = 0; y < h; ++y) png_write_row(png, raw.data() + row * static_cast<size_t>(y));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  std::fclose(f);
}

std::vector<uint8_t> encode_jpeg(const data::Image& im, int quality) {
  tjhandle tj = tjInitCompress();
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  const int pf = im.channels == 1 ? TJPF_GRAY : TJPF_RGB;
  EXPECT_EQ(0, tjCompress2(tj, im.pixels.data(), im.width, 0, im.height, pf, &buf, &size,
                           im.channels == 1 ? TJSAMP_GRAY : TJSAMP_444, quality, 0));
  std::vector<uint8_t> out(buf, buf + size);
  tjFree(buf);
  tjDestroy(tj);
  return out;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(Decode, PngGreyRgbRgbaRoundTrip) {
  const fs::path dir = scratch("png");
  for (int c : {1, 3, 4}) {
    data::Image im = pattern(5, 7, c);
    data::write_file(dir / "a.png", data::encode_png(im));
    data::Image rgb = data::decode_file(dir / "a.png", 3), grey = data::decode_file(dir / "a.png", 1);
    ASSERT_EQ(rgb.channels, 3);
    ASSERT_EQ(grey.channels, 1);
    ASSERT_EQ(rgb.height, 5);
    ASSERT_EQ(rgb.width, 7);
    for (size_t p = 0; p < 35; ++p) {
      const uint8_t* src = &im.pixels[p * static_cast<size_t>(c)];
      for (int k = 0; k < 3; ++k) EXPECT_EQ(rgb.pixels[p * 3 + k], c == 1 ? src[0] : src[k]) << c;  // alpha dropped
      const int luma = c == 1 ? src[0] : (19595 * src[0] + 38470 * src[1] + 7471 * src[2] + 0x8000) >> 16;
      EXPECT_EQ(grey.pixels[p], luma) << c;
    }
  }
}

TEST(Decode, PaletteAnd16BitAndLowDepthPngs) {
  const fs::path dir = scratch("png2");
  std::vector<png_color> pal = {{10, 20, 30}, {200, 100, 50}, {0, 255, 7}};
  write_png(dir / "p.png", 3, 2, PNG_COLOR_TYPE_PALETTE, 8, {0, 1, 2, 2, 1, 0}, pal);
  data::Image p = data::decode_file(dir / "p.png", 3);
  ASSERT_EQ(p.channels, 3);
  for (int i = 0; i < 6; ++i) {
    const png_color& e = pal[std::vector<int>{0, 1, 2, 2, 1, 0}[static_cast<size_t>(i)]];
    EXPECT_EQ(p.pixels[static_cast<size_t>(i) * 3], e.red);
    EXPECT_EQ(p.pixels[static_cast<size_t>(i) * 3 + 1], e.green);
    EXPECT_EQ(p.pixels[static_cast<size_t>(i) * 3 + 2], e.blue);
  }
  // 16-bit grey: the high byte, as PIL.
  write_png(dir / "g16.png", 2, 1, PNG_COLOR_TYPE_GRAY, 16, {0x12, 0x34, 0xfe, 0xff});
  data::Image g = data::decode_file(dir / "g16.png", 1);
  EXPECT_EQ(g.pixels, (std::vector<uint8_t>{0x12, 0xfe}));
  // 1-bit grey expands to 0 / 255; grey + alpha drops the alpha.
  write_png(dir / "g1.png", 8, 1, PNG_COLOR_TYPE_GRAY, 1, {0b10100000});
  EXPECT_EQ(data::decode_file(dir / "g1.png", 1).pixels, (std::vector<uint8_t>{255, 0, 255, 0, 0, 0, 0, 0}));
  write_png(dir / "ga.png", 2, 1, PNG_COLOR_TYPE_GRAY_ALPHA, 8, {9, 0, 77, 255});
  EXPECT_EQ(data::decode_file(dir / "ga.png", 1).pixels, (std::vector<uint8_t>{9, 77}));
}

TEST(Decode, JpegMatchesTheSourceWithinCompressionError) {
  for (int c : {1, 3}) {
    data::Image im{16, 24, c, {}};
    for (int y = 0; y < 16; ++y)  // smooth content: small JPEG error
      for (int x = 0; x < 24; ++x)
        for (int k = 0; k < c; ++k) im.pixels.push_back(static_cast<uint8_t>(40 + 5 * x + 3 * y + 20 * k));
    data::Image d = data::decode_image(encode_jpeg(im, 95), "mem.jpg", c);
    ASSERT_EQ(d.channels, c);
    double err = 0;
    for (size_t i = 0; i < im.pixels.size(); ++i) err = std::max(err, std::abs(double(d.pixels[i]) - im.pixels[i]));
    EXPECT_LE(err, 6) << c;
    EXPECT_EQ(data::decode_image(encode_jpeg(im, 95), "mem.jpg", 3).channels, 3);  // grey JPEG to 3 channels too
  }
}

TEST(Decode, BadFilesAreErrorsNamingThem) {
  const fs::path dir = scratch("bad");
  data::Image im = pattern(32, 32, 3);
  auto jpg = encode_jpeg(im, 90);
  data::write_file(dir / "trunc.jpg", std::vector<uint8_t>(jpg.begin(), jpg.begin() + static_cast<long>(jpg.size() / 2)));
  EXPECT_NE(error_of([&] { data::decode_file(dir / "trunc.jpg", 3); }).find((dir / "trunc.jpg").string() + ": corrupt JPEG"),
            std::string::npos);
  auto png = data::encode_png(im);
  data::write_file(dir / "trunc.png", std::vector<uint8_t>(png.begin(), png.begin() + static_cast<long>(png.size() / 2)));
  EXPECT_NE(error_of([&] { data::decode_file(dir / "trunc.png", 3); }).find("trunc.png: corrupt PNG"), std::string::npos);
  data::write_file(dir / "text.jpg", {'h', 'e', 'l', 'l', 'o'});
  EXPECT_NE(error_of([&] { data::decode_file(dir / "text.jpg", 3); }).find("text.jpg: not a JPEG or PNG file"), std::string::npos);
  data::write_file(dir / "empty.png", {});
  EXPECT_NE(error_of([&] { data::decode_file(dir / "empty.png", 3); }).find("empty.png: an empty file"), std::string::npos);
  EXPECT_NE(error_of([&] { data::decode_file(dir / "missing.png", 3); }).find("missing.png: cannot open"), std::string::npos);
  png[16] = png[17] = png[18] = png[19] = 0;  // width 0 in IHDR
  data::write_file(dir / "zero.png", png);
  EXPECT_NE(error_of([&] { data::decode_file(dir / "zero.png", 3); }).find("zero.png: corrupt PNG"), std::string::npos);
  EXPECT_THROW(data::decode_file(dir / "zero.png", 3), data::DecodeError);
}

TEST(Transforms, RandomResizedCropIsSeededAndInBounds) {
  bool flips[2] = {false, false};
  for (uint64_t s = 0; s < 200; ++s) {
    bool f1 = false, f2 = false;
    data::Box a = data::random_resized_crop(375, 500, data::sample_seed(7, 1, static_cast<int64_t>(s)), &f1);
    data::Box b = data::random_resized_crop(375, 500, data::sample_seed(7, 1, static_cast<int64_t>(s)), &f2);
    EXPECT_EQ(a.top, b.top);
    EXPECT_EQ(a.width, b.width);
    EXPECT_EQ(f1, f2);
    flips[f1] = true;
    EXPECT_GE(a.top, 0);
    EXPECT_GE(a.left, 0);
    EXPECT_LE(a.top + a.height, 375);
    EXPECT_LE(a.left + a.width, 500);
    EXPECT_GE(a.height * a.width, 0.07 * 375 * 500);
  }
  EXPECT_TRUE(flips[0] && flips[1]);
  EXPECT_NE(data::sample_seed(7, 1, 5), data::sample_seed(7, 2, 5));
  EXPECT_NE(data::sample_seed(7, 1, 5), data::sample_seed(7, 1, 6));
  EXPECT_NE(data::sample_seed(7, 1, 5), data::sample_seed(8, 1, 5));
}

TEST(Transforms, ShapesAndTheEnlargingResizeIsTheIdxPaths) {
  data::Image im = pattern(30, 40, 3);
  data::TransformSpec t;
  t.image_size = 24;
  t.mean = {0.5, 0.4, 0.3};
  t.std = {0.2, 0.3, 0.4};
  for (std::string kind : {"vtab", "timm_eval", "timm_train"})
    for (std::string interp : {"bilinear", "bicubic"}) {
      t.kind = kind, t.interpolation = interp;
      torch::Tensor x = data::apply_transform(im, t, 3);
      EXPECT_EQ(x.sizes(), torch::IntArrayRef({3, 24, 24})) << kind;
      EXPECT_TRUE(torch::equal(x, data::apply_transform(im, t, 3))) << kind;
    }
  // timm_eval of an image already at the crop size's resize: the centre crop of the normalised pixels.
  t.kind = "timm_eval", t.interpolation = "bilinear", t.crop_pct = 0.75, t.image_size = 30;  // short side to 40
  data::Image sq = pattern(40, 50, 3);
  torch::Tensor raw = torch::from_blob(sq.pixels.data(), {40, 50, 3}, torch::kUInt8).permute({2, 0, 1}).to(torch::kFloat32) / 255.0;
  torch::Tensor want = raw.slice(1, 5, 35).slice(2, 10, 40);  // round((40-30)/2) = 5, round((50-30)/2) = 10
  for (int c = 0; c < 3; ++c) want[c] = (want[c] - t.mean[static_cast<size_t>(c)]) / t.std[static_cast<size_t>(c)];
  EXPECT_LE((data::apply_transform(sq, t, 0) - want).abs().max().item<double>(), 1e-6);
  // Enlarging 28 -> 32: exactly the interpolate of the Fashion-MNIST path.
  data::Image g = pattern(28, 28, 1);
  t.kind = "vtab", t.image_size = 32, t.mean = {0.2860}, t.std = {0.3530};
  torch::Tensor x = torch::from_blob(g.pixels.data(), {1, 1, 28, 28}, torch::kUInt8).to(torch::kFloat32).div_(255.0);
  namespace F = torch::nn::functional;
  x = F::interpolate(x, F::InterpolateFuncOptions().size(std::vector<int64_t>{32, 32}).mode(torch::kBilinear).align_corners(false));
  x = x.sub_(0.2860).div_(0.3530);
  EXPECT_TRUE(torch::equal(data::apply_transform(g, t, 0), x[0]));
  t.interpolation = "nearest";
  EXPECT_NE(error_of([&] { data::check_transform(t); }).find("data.interpolation=nearest"), std::string::npos);
}

// --- data sets --------------------------------------------------------------------------

namespace {

// The first n_train / n_test Fashion-MNIST images ordered by label, as an IDX folder and as a
// PNG image folder (plus list files) of the same order.
fs::path fashion_folder(int64_t n_train, int64_t n_test) {
  const fs::path out = scratch("fashion");
  for (int split = 0; split < 2; ++split) {
    const std::string prefix = split ? "t10k" : "train", dir = split ? "test" : "train";
    auto img = io::read_idx_u8(kFashion + "/" + prefix + "-images-idx3-ubyte.gz");
    auto lab = io::read_idx_u8(kFashion + "/" + prefix + "-labels-idx1-ubyte.gz");
    const int64_t n = split ? n_test : n_train;
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lab.data[a] < lab.data[b]; });
    std::vector<uint8_t> head_i = {0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 28, 0, 0, 0, 28}, head_l = {0, 0, 8, 1, 0, 0, 0, 0};
    head_i[6] = head_l[6] = static_cast<uint8_t>(n >> 8), head_i[7] = head_l[7] = static_cast<uint8_t>(n & 0xff);
    fs::create_directories(out / "idx");
    fs::create_directories(out / "png");
    std::ofstream list(out / "png" / (dir + ".txt"));
    for (size_t k = 0; k < order.size(); ++k) {
      const uint8_t* px = img.data.data() + order[k] * 784;
      head_i.insert(head_i.end(), px, px + 784);
      head_l.push_back(lab.data[static_cast<size_t>(order[k])]);
      const std::string rel = dir + "/c" + std::to_string(head_l.back()) + "/" + std::to_string(1000 + k) + ".png";
      fs::create_directories((out / "png" / rel).parent_path());
      data::write_file(out / "png" / rel, data::encode_png({28, 28, 1, std::vector<uint8_t>(px, px + 784)}));
      list << rel << " " << int(head_l.back()) << "\n";
    }
    data::write_file(out / "idx" / (prefix + "-images-idx3-ubyte"), head_i);
    data::write_file(out / "idx" / (prefix + "-labels-idx1-ubyte"), head_l);
  }
  return out;
}

ViTConfig grey_model(int64_t classes, int64_t size = 28, int64_t chans = 1) {
  ViTConfig m;
  m.image_size = size, m.in_chans = chans, m.num_classes = classes, m.patch_size = 7, m.dim = 32, m.depth = 1, m.heads = 4,
  m.mlp_dim = 64;
  return m;
}

}  // namespace

TEST(Datasets, PngFolderAndListFileEqualTheIdxTensorsBitForBit) {
  if (!fs::exists(kFashion)) GTEST_SKIP() << "no Fashion-MNIST";
  const fs::path root = fashion_folder(200, 60);
  // IDX reader wants the .gz names: it reads raw files too, so link them.
  for (const char* f : {"train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"})
    fs::create_symlink(root / "idx" / f, root / "idx" / (std::string(f) + ".gz"));
  for (auto [size, chans] : {std::pair<int64_t, int64_t>{28, 1}, {32, 1}, {28, 3}}) {
    ViTConfig m = grey_model(5, size, chans);
    DataConfig idx;
    idx.root = (root / "idx").string(), idx.classes = "2-6", idx.val_samples = 20, idx.batch_size = 16, idx.seed = 3;
    DataConfig folder = idx, list = idx;
    folder.dataset = "imagefolder", folder.root = (root / "png").string(), folder.workers = 3;
    folder.mean = {0.2860}, folder.std = {0.3530};  // Fashion-MNIST's (ImageNet's by default for 3 channels)
    list.dataset = "filelist", list.root = folder.root, list.train_list = "train.txt", list.test_list = "test.txt";
    list.classes = "";  // a list file's labels are the model's
    Splits a = load_splits(idx, m), b = load_splits(folder, m);
    ASSERT_EQ(a.train.size(), b.train.size());
    EXPECT_TRUE(torch::equal(a.train.labels, b.train.labels));
    EXPECT_EQ(b.train.class_names, (std::vector<std::string>{"c2", "c3", "c4", "c5", "c6"}));
    EXPECT_EQ(a.train.class_names[0], "Pullover");
    torch::Tensor all = torch::arange(a.test.size());
    EXPECT_TRUE(torch::equal(preprocess(a.test, all, m, idx), preprocess(b.test, all, m, folder))) << size << " " << chans;
    Prefetcher pa(a.train, m, idx, 0, 1), pb(b.train, m, folder, 0, 1);
    for (int64_t step = 0; step < 14; ++step) {  // past epoch boundaries (~80 / 16 a epoch)
      Batch x = pa.get(step), y = pb.get(step);
      ASSERT_TRUE(torch::equal(x.images, y.images)) << step;
      ASSERT_TRUE(torch::equal(x.labels, y.labels)) << step;
    }
    if (chans == 1 && size == 28) {  // the list file: all 10 classes, the same images
      ViTConfig m10 = grey_model(10);
      DataConfig idx10 = idx;
      idx10.classes = "";
      Splits c = load_splits(idx10, m10), d = load_splits(list, m10);
      torch::Tensor t = torch::arange(c.test.size());
      EXPECT_TRUE(torch::equal(preprocess(c.test, t, m10, idx10), preprocess(d.test, t, m10, list)));
      EXPECT_TRUE(torch::equal(c.train.labels, d.train.labels));
    }
  }
}

TEST(Datasets, SameBatchesForAnyDpWorkersAndAfterAResume) {
  const fs::path root = scratch("colour");
  for (const char* split : {"train", "test"})
    for (int c = 0; c < 3; ++c) {
      fs::create_directories(root / split / ("k" + std::to_string(c)));
      for (int i = 0; i < 7; ++i)
        data::write_file(root / split / ("k" + std::to_string(c)) / (std::to_string(i) + ".png"),
                         data::encode_png(pattern(20 + i, 26 - i, 3, c * 10 + i)));
    }
  data::write_file(root / "train" / "k0" / "notes.txt", {'x'});  // ignored
  ViTConfig m = grey_model(3, 16, 3);
  DataConfig cfg;
  cfg.dataset = "imagefolder", cfg.root = root.string(), cfg.batch_size = 8, cfg.transform = "timm_train", cfg.workers = 1;
  Splits s = load_splits(cfg, m);
  EXPECT_EQ(describe(s, cfg), "imagefolder " + root.string() + ": 3 classes, 21 train / 0 val / 21 test images");
  std::vector<Batch> ref;
  {
    Prefetcher p(s.train, m, cfg, 0, 1);
    for (int64_t step = 0; step < 6; ++step) ref.push_back(p.get(step));
  }
  // Augmentation depends on (seed, epoch, index): the same sample, another epoch, another crop.
  EXPECT_TRUE(torch::equal(load_sample(s.train, 4, 1, m, cfg, true), load_sample(s.train, 4, 1, m, cfg, true)));
  EXPECT_FALSE(torch::equal(load_sample(s.train, 4, 1, m, cfg, true), load_sample(s.train, 4, 2, m, cfg, true)));
  EXPECT_FALSE(torch::equal(load_sample(s.train, 4, 1, m, cfg, true), load_sample(s.train, 5, 1, m, cfg, true)));
  for (int dp : {1, 2, 4}) {
    DataConfig c3 = cfg;
    c3.workers = 3, c3.prefetch = 3;
    std::vector<std::unique_ptr<Prefetcher>> ranks;
    for (int r = 0; r < dp; ++r) ranks.push_back(std::make_unique<Prefetcher>(s.train, m, c3, r, dp));
    for (int64_t step : {0, 1, 2, 5, 3, 4}) {  // out of order: the queue restarts there, as a resume
      std::vector<torch::Tensor> parts, labels;
      for (auto& p : ranks) {
        Batch b = p->get(step);
        parts.push_back(b.images), labels.push_back(b.labels);
      }
      EXPECT_TRUE(torch::equal(torch::cat(parts), ref[static_cast<size_t>(step)].images)) << dp << " " << step;
      EXPECT_TRUE(torch::equal(torch::cat(labels), ref[static_cast<size_t>(step)].labels)) << dp << " " << step;
    }
  }
  // A stage that does not decode gets the labels alone.
  Prefetcher later(s.train, m, cfg, 0, 1, false);
  Batch b = later.get(2);
  EXPECT_FALSE(b.images.defined());
  EXPECT_TRUE(torch::equal(b.labels, ref[2].labels));
}

TEST(Datasets, BadImagesErrorOrAreSkippedForTheNextOfTheirClass) {
  const fs::path root = scratch("badset");
  for (const char* split : {"train", "test"})
    for (int c = 0; c < 2; ++c) {
      fs::create_directories(root / split / ("k" + std::to_string(c)));
      for (int i = 0; i < 4; ++i)
        data::write_file(root / split / ("k" + std::to_string(c)) / (std::to_string(i) + ".png"),
                         data::encode_png(pattern(8, 8, 1, c * 4 + i)));
    }
  data::write_file(root / "train" / "k1" / "2.png", {'n', 'o', 't'});
  ViTConfig m = grey_model(2, 8);
  DataConfig cfg;
  cfg.dataset = "imagefolder", cfg.root = root.string(), cfg.batch_size = 8;
  Splits s = load_splits(cfg, m);
  {
    Prefetcher p(s.train, m, cfg, 0, 1);
    EXPECT_NE(error_of([&] { p.get(0); }).find((root / "train/k1/2.png").string() + ": not a JPEG or PNG"), std::string::npos);
  }
  cfg.bad_images = "skip";
  s = load_splits(cfg, m);
  Prefetcher p(s.train, m, cfg, 0, 1);
  Batch b = p.get(0);  // every sample of the epoch: the bad one's place holds the next of class k1
  EXPECT_EQ(s.train.skipped->count(), 1u);
  int64_t bad = 0;
  while (s.train.files[static_cast<size_t>(bad)].find("k1/2.png") == std::string::npos) ++bad;
  int64_t next = (bad + 1) % 8;
  while (s.train.labels[next].item<int64_t>() != 1) next = (next + 1) % 8;
  torch::Tensor good = preprocess(s.train, torch::tensor({next}, torch::kInt64), m, cfg)[0];
  int64_t copies = 0;
  for (int64_t i = 0; i < 8; ++i) copies += torch::equal(b.images[i], good);
  EXPECT_EQ(copies, 2);
  EXPECT_EQ(b.labels.sum().item<int64_t>(), 4);
  cfg.bad_images = "maybe";
  EXPECT_NE(error_of([&] { load_splits(cfg, m); }).find("data.bad_images=maybe"), std::string::npos);
}

TEST(Datasets, IndexErrorsNameTheFileAndValue) {
  const fs::path root = scratch("index");
  ViTConfig m = grey_model(2, 8);
  DataConfig cfg;
  cfg.dataset = "imagefolder", cfg.root = root.string();
  fs::create_directories(root / "train" / "a");
  fs::create_directories(root / "train" / "b");
  data::write_file(root / "train" / "a" / "x.png", data::encode_png(pattern(4, 4, 1)));
  EXPECT_NE(error_of([&] { load_splits(cfg, m); }).find((root / "test").string() + ": missing split folder"), std::string::npos);
  fs::create_directories(root / "test" / "a");
  fs::create_directories(root / "test" / "b");
  data::write_file(root / "test" / "a" / "x.png", data::encode_png(pattern(4, 4, 1)));
  data::write_file(root / "test" / "b" / "x.png", data::encode_png(pattern(4, 4, 1)));
  EXPECT_NE(error_of([&] { load_splits(cfg, m); }).find((root / "train" / "b").string() + ": empty class folder"), std::string::npos);
  data::write_file(root / "train" / "b" / "y.PNG", data::encode_png(pattern(4, 4, 1)));
  EXPECT_NO_THROW(load_splits(cfg, m));
  ViTConfig m3 = grey_model(3, 8);
  EXPECT_NE(error_of([&] { load_splits(cfg, m3); }).find("model.num_classes=3 but data.root=" + root.string() + " has 2 classes"),
            std::string::npos);
  cfg.dataset = "filelist", cfg.train_list = "l.txt", cfg.test_list = "l.txt";
  auto list_error = [&](const std::string& text) {
    std::ofstream(root / "l.txt") << text;
    return error_of([&] { load_splits(cfg, m); });
  };
  EXPECT_EQ(list_error("train/a/x.png 0\ntrain/b/y.PNG 1\n"), "(no error)");
  EXPECT_NE(list_error("train/a/x.png 0\ntrain/b/y.PNG\n").find((root / "l.txt").string() + ":2: expected 'relative/path label'"),
            std::string::npos);
  EXPECT_NE(list_error("train/a/x.png zero\n").find("l.txt:1: label 'zero' is not an integer"), std::string::npos);
  EXPECT_NE(list_error("train/a/x.png 2\n").find("l.txt:1: label 2 is outside 0..1 (model.num_classes=2)"), std::string::npos);
  EXPECT_NE(list_error("\ntrain/a/nope.png 1\n").find("l.txt:2: " + (root / "train/a/nope.png").string() + " does not exist"),
            std::string::npos);
  cfg.test_list = "absent.txt";
  EXPECT_NE(list_error("train/a/x.png 0\n").find("data.test_list=absent.txt: cannot open"), std::string::npos);
  cfg.mean = {0.1, 0.2};
  EXPECT_NE(error_of([&] { load_splits(cfg, m); }).find("data.mean has 2 values for model.in_chans=1"), std::string::npos);
}

TEST(Datasets, ClassNamesFile) {
  const fs::path dir = scratch("names");
  write_class_names((dir / "classes.json").string(), {"cat", "dog \"x\""});
  EXPECT_EQ(read_class_names((dir / "classes.json").string()), (std::vector<std::string>{"cat", "dog \"x\""}));
  EXPECT_TRUE(read_class_names((dir / "none.json").string()).empty());
  std::ofstream(dir / "bad.json") << "{";
  EXPECT_NE(error_of([&] { read_class_names((dir / "bad.json").string()); }).find("bad.json: malformed JSON: parse error"),
            std::string::npos);
  std::ofstream(dir / "object.json") << R"({"0": "cat"})";
  EXPECT_NE(error_of([&] { read_class_names((dir / "object.json").string()); }).find("object.json: not a JSON array"),
            std::string::npos);
}
