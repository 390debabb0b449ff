// Reading, resolving, overriding and printing configs (Protobuf text format, via reflection).
#pragma once

#include <google/protobuf/message.h>

#include <string>
#include <vector>

#include "base/status.h"
#include "configs/hydra.pb.h"

namespace hydra::config {

// Parses a text-format file into `msg`. Errors name the file, line and column.
Status load_text_file(const std::string& path, google::protobuf::Message* msg);
Status parse_text(const std::string& text, const std::string& source_name,
                  google::protobuf::Message* msg);
Expected<RunConfig> load_run_config(const std::string& path);

// Sets every unset scalar field (recursively, creating sub-messages) to its default, so that the
// printed config shows every value in effect.
void resolve_defaults(google::protobuf::Message* msg);

// Applies "a.b.c=value" (repeated fields: "a.b=[1, 2]" or "a.b=x,y"; messages: text format in
// braces). Errors name the path and list the fields that exist at the failing level.
Status apply_override(google::protobuf::Message* msg, const std::string& assignment);
// Each of `assignments` in order; the first error is returned.
Status apply_overrides(google::protobuf::Message* msg, const std::vector<std::string>& assignments);

// Every floating-point field set in `msg` (recursively) is finite: an error names the first that is
// not, as "SOURCE: PREFIX.path.to.field = nan must be a finite number". `prefix` names msg's own
// path.
Status check_finite_numbers(const google::protobuf::Message& msg, const std::string& source,
                            const std::string& prefix = "");

std::string to_text(const google::protobuf::Message& msg);
Status write_text_file(const std::string& path, const google::protobuf::Message& msg);

}  // namespace hydra::config
