#include "peft/targets.h"

#include <regex>
#include <stdexcept>

#include "peft/peft_config.h"

namespace shardtune {

namespace {

// The candidates each pattern of `spec` matches; `key` names the config key in errors.
std::vector<bool> matches(const std::vector<std::string>& candidates, const std::string& spec, const char* key,
                          bool require_match) {
  std::vector<bool> hit(candidates.size(), false);
  if (spec.rfind("re:", 0) == 0) {
    std::regex re;
    try {
      re = std::regex(spec.substr(3));
    } catch (const std::regex_error& e) {
      throw std::invalid_argument(std::string(key) + "=" + spec + " is not a valid regex: " + e.what());
    }
    bool any = false;
    for (size_t i = 0; i < candidates.size(); ++i) any |= (hit[i] = std::regex_match(candidates[i], re));
    if (!any && require_match) throw std::invalid_argument(std::string(key) + ": regex '" + spec + "' matches no module");
    return hit;
  }
  for (const std::string& pattern : split_list(spec)) {
    bool any = false;
    for (size_t i = 0; i < candidates.size(); ++i) {
      const std::string& c = candidates[i];
      bool m = c == pattern ||
               (c.size() > pattern.size() && c.compare(c.size() - pattern.size(), pattern.size(), pattern) == 0 &&
                c[c.size() - pattern.size() - 1] == '.');
      if (m) hit[i] = any = true;
    }
    if (!any && require_match) {
      std::string example = candidates.empty() ? "none" : candidates.front();
      throw std::invalid_argument(std::string(key) + ": pattern '" + pattern + "' matches no module (modules look like " +
                                  example + ")");
    }
  }
  return hit;
}

}  // namespace

std::vector<std::string> match_targets(const std::vector<std::string>& candidates, const std::string& targets,
                                       const std::string& exclude, bool require_match) {
  std::vector<bool> in = matches(candidates, targets, "peft.targets", require_match);
  std::vector<bool> out = exclude.empty() ? std::vector<bool>(candidates.size(), false)
                                          : matches(candidates, exclude, "peft.exclude", require_match);
  std::vector<std::string> result;
  for (size_t i = 0; i < candidates.size(); ++i)
    if (in[i] && !out[i]) result.push_back(candidates[i]);
  return result;
}

}  // namespace shardtune
