// The file index of an image data set, built once: torchvision's ImageFolder layout
// (root/<split>/<class>/<file>) and VTAB-1k list files ("relative/path label" per line).
// Torch-free; every error names the folder, file (file:line) or key and the value.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace shardtune::data {

struct FileIndex {
  std::vector<std::string> paths;
  std::vector<int64_t> labels;
};

// .jpg .jpeg .png, any case.
bool is_image_name(const std::string& name);

struct FolderIndex {
  std::vector<std::string> classes;  // sorted class folder names of the train split; index = label
  FileIndex train, val, test;
  bool has_val = false;
  int64_t ignored_files = 0;         // files without an image extension
};

// root/train and root/test must exist (root/val is optional) and hold the same class folders;
// an empty class folder is an error. Files sorted by name within a class, classes in order.
FolderIndex index_imagefolder(const std::string& root);

// One list file: paths relative to `root`, labels in 0..num_classes-1; `key` (data.train_list)
// names the setting in errors. Every listed file must exist.
FileIndex index_filelist(const std::string& root, const std::string& list, const std::string& key, int64_t num_classes);

}  // namespace shardtune::data
