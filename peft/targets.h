// Target-module matching, as Hugging Face PEFT: a list matches a module path exactly or as
// a ".suffix"; a single value starting with "re:" is a full-match regex. Exclusions use the
// same syntax and remove matches.
#pragma once

#include <string>
#include <vector>

namespace shardtune {

// Returns the candidates (in their order) matched by `targets` and not by `exclude`.
// Throws std::invalid_argument naming the pattern when a target or exclude pattern matches
// no candidate (unless !require_match: a pipeline stage holds only some of the modules the
// patterns were checked against), or when a regex does not compile.
std::vector<std::string> match_targets(const std::vector<std::string>& candidates, const std::string& targets,
                                       const std::string& exclude = "", bool require_match = true);

}  // namespace shardtune
