// Every scalar number of a run config, walked from hydra.proto's descriptors: the fields the
// bad-input tests set to extreme values (repeated fields, strings, booleans and enums have tests of
// their own).
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "configs/hydra.pb.h"

namespace hydra::testing {

// (dotted path as --set takes it, descriptor), nested messages up to four levels deep.
inline std::vector<std::pair<std::string, const google::protobuf::FieldDescriptor*>>
numeric_config_fields() {
  using google::protobuf::Descriptor;
  using google::protobuf::FieldDescriptor;
  std::vector<std::pair<std::string, const FieldDescriptor*>> fields;
  std::function<void(const Descriptor*, const std::string&, int)> walk =
      [&](const Descriptor* d, const std::string& prefix, int depth) {
        for (int i = 0; i < d->field_count(); ++i) {
          const FieldDescriptor* f = d->field(i);
          if (f->is_repeated()) continue;
          const std::string name = prefix + f->name();
          if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
            if (depth < 4) walk(f->message_type(), name + ".", depth + 1);
          } else if (f->cpp_type() != FieldDescriptor::CPPTYPE_STRING &&
                     f->cpp_type() != FieldDescriptor::CPPTYPE_BOOL &&
                     f->cpp_type() != FieldDescriptor::CPPTYPE_ENUM) {
            fields.push_back({name, f});
          }
        }
      };
  walk(config::RunConfig::descriptor(), "", 0);
  return fields;
}

}  // namespace hydra::testing
