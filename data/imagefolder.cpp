#include "data/imagefolder.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace shardtune::data {

namespace fs = std::filesystem;

bool is_image_name(const std::string& name) {
  std::string ext = fs::path(name).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".jpg" || ext == ".jpeg" || ext == ".png";
}

namespace {

// On a terminal, a running count while a big folder is listed.
struct Progress {
  bool tty = ::isatty(STDERR_FILENO) != 0;
  int64_t count = 0;
  void tick(const std::string& root) {
    if (tty && ++count % 5000 == 0) std::fprintf(stderr, "\rindexing %s: %lld files", root.c_str(), static_cast<long long>(count));
  }
  ~Progress() {
    if (tty && count >= 5000) std::fprintf(stderr, "\n");
  }
};

std::vector<std::string> sorted_entries(const fs::path& dir, bool dirs) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (dirs ? e.is_directory() : !e.is_directory()) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

FileIndex index_split(const fs::path& dir, const std::vector<std::string>& classes, int64_t* ignored, Progress& progress) {
  FileIndex out;
  for (size_t c = 0; c < classes.size(); ++c) {
    const fs::path cdir = dir / classes[c];
    if (!fs::is_directory(cdir))
      throw std::runtime_error(cdir.string() + ": missing class folder (the train split has class '" + classes[c] + "')");
    int64_t found = 0;
    for (const auto& name : sorted_entries(cdir, false)) {
      if (!is_image_name(name)) {
        ++*ignored;
        continue;
      }
      out.paths.push_back((cdir / name).string());
      out.labels.push_back(static_cast<int64_t>(c));
      ++found;
      progress.tick(dir.parent_path().string());
    }
    if (found == 0) throw std::runtime_error(cdir.string() + ": empty class folder (no .jpg, .jpeg or .png file)");
  }
  return out;
}

}  // namespace

FolderIndex index_imagefolder(const std::string& root) {
  FolderIndex f;
  const fs::path r(root);
  if (!fs::is_directory(r)) throw std::runtime_error("data.root=" + root + ": not a folder");
  for (const char* split : {"train", "test"})
    if (!fs::is_directory(r / split))
      throw std::runtime_error((r / split).string() + ": missing split folder (imagefolder needs train/ and test/, val/ optional)");
  f.classes = sorted_entries(r / "train", true);
  if (f.classes.empty()) throw std::runtime_error((r / "train").string() + ": no class folders");
  for (const char* split : {"val", "test"}) {
    if (!fs::is_directory(r / split)) continue;
    auto other = sorted_entries(r / split, true);
    if (other != f.classes)
      throw std::runtime_error((r / split).string() + ": its " + std::to_string(other.size()) +
                               " class folders differ from the " + std::to_string(f.classes.size()) + " of " +
                               (r / "train").string());
  }
  Progress progress;
  f.train = index_split(r / "train", f.classes, &f.ignored_files, progress);
  f.test = index_split(r / "test", f.classes, &f.ignored_files, progress);
  f.has_val = fs::is_directory(r / "val");
  if (f.has_val) f.val = index_split(r / "val", f.classes, &f.ignored_files, progress);
  return f;
}

FileIndex index_filelist(const std::string& root, const std::string& list, const std::string& key, int64_t num_classes) {
  const fs::path path = fs::path(list).is_absolute() ? fs::path(list) : fs::path(root) / list;
  std::ifstream in(path);
  if (!in) throw std::runtime_error(key + "=" + list + ": cannot open " + path.string());
  FileIndex out;
  std::string line;
  for (int64_t lineno = 1; std::getline(in, line); ++lineno) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    // The path may hold spaces: the label is the last field.
    const size_t end = line.find_last_not_of(" \t");
    const size_t sep = line.find_last_of(" \t", end);
    const std::string where = path.string() + ":" + std::to_string(lineno);
    if (sep == std::string::npos) throw std::runtime_error(where + ": expected 'relative/path label', got '" + line + "'");
    const std::string rel = line.substr(0, line.find_last_not_of(" \t", sep) + 1), lab = line.substr(sep + 1, end - sep);
    int64_t label = -1;
    try {
      size_t used = 0;
      label = std::stoll(lab, &used);
      if (used != lab.size()) throw std::invalid_argument(lab);
    } catch (const std::exception&) {
      throw std::runtime_error(where + ": label '" + lab + "' is not an integer");
    }
    if (label < 0 || label >= num_classes)
      throw std::runtime_error(where + ": label " + std::to_string(label) + " is outside 0.." + std::to_string(num_classes - 1) +
                               " (model.num_classes=" + std::to_string(num_classes) + ")");
    const fs::path file = fs::path(root) / rel;
    if (!fs::exists(file)) throw std::runtime_error(where + ": " + file.string() + " does not exist");
    out.paths.push_back(file.string());
    out.labels.push_back(label);
  }
  if (out.paths.empty()) throw std::runtime_error(key + "=" + list + ": " + path.string() + " lists no images");
  return out;
}

}  // namespace shardtune::data
