// Writing a file so that readers see the old content or the new, never a torn one.
#pragma once

#include <cstdio>
#include <functional>
#include <string>

namespace shardtune::io {

// Calls `body` with a temporary file beside `path`, flushes and fsyncs it, then renames
// it over `path` and fsyncs the directory. On any failure the temporary is removed, the
// old `path` is untouched and a std::runtime_error names the path and the errno text.
void write_atomically(const std::string& path, const std::function<void(std::FILE*)>& body);

// fsyncs a directory, so that renames into it survive a crash; best effort on file systems
// that cannot.
void fsync_directory(const std::string& dir);

// Convenience: the whole content at once.
void write_text_atomically(const std::string& path, const std::string& content);

// Throws std::runtime_error naming the file when it cannot be read.
std::string read_text(const std::string& path);

}  // namespace shardtune::io
