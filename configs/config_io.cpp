#include "configs/config_io.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

namespace hydra::config {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

class Collector : public google::protobuf::io::ErrorCollector {
 public:
  explicit Collector(std::string source) : source_(std::move(source)) {}
  void AddError(int line, int column, const std::string& message) override {
    if (first_.empty())
      first_ = source_ + ":" + std::to_string(line + 1) + ":" + std::to_string(column + 1) + ": " +
               message;
  }
  void AddWarning(int, int, const std::string&) override {}
  const std::string& first() const { return first_; }

 private:
  std::string source_, first_;
};

std::string field_list(const Descriptor* d) {
  std::string out;
  for (int i = 0; i < d->field_count(); ++i) out += (i ? ", " : "") + d->field(i)->name();
  return out;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\n\r"), e = s.find_last_not_of(" \t\n\r");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

std::vector<std::string> split_list(std::string v) {
  v = trim(v);
  if (v.size() >= 2 && v.front() == '[' && v.back() == ']') v = v.substr(1, v.size() - 2);
  std::vector<std::string> items;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item = trim(item);
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

// Parses one scalar `text` into `field` of `msg` (repeated: appends) using the text-format parser,
// which knows enum names, bools and number syntax.
Status set_scalar(Message* msg, const FieldDescriptor* field, const std::string& text,
                  const std::string& path) {
  std::string value = text;
  if (field->cpp_type() == FieldDescriptor::CPPTYPE_STRING &&
      (value.empty() || value.front() != '"'))
    value = "\"" + value + "\"";
  std::unique_ptr<Message> tmp(msg->New());
  Collector errors(path);
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFieldValueFromString(value, field, tmp.get()))
    return invalid_argument("--set " + path + "=" + text + ": not a valid " +
                            std::string(field->cpp_type_name()) + " for this field" +
                            (field->enum_type() ? " (one of the enum names)" : ""));
  const Reflection* r = msg->GetReflection();
  if (field->is_repeated()) {
    // tmp holds one element; copy it over by merging a message that has only that field.
    std::unique_ptr<Message> one(msg->New());
    one->GetReflection()->Swap(one.get(), tmp.get());
    std::vector<const FieldDescriptor*> fields;
    one->GetReflection()->ListFields(*one, &fields);
    for (const FieldDescriptor* f : fields)
      if (f != field) one->GetReflection()->ClearField(one.get(), f);
    msg->MergeFrom(*one);
  } else {
    std::vector<const FieldDescriptor*> only = {field};
    r->SwapFields(msg, tmp.get(), only);
  }
  return ok_status();
}

}  // namespace

Status parse_text(const std::string& text, const std::string& source_name, Message* msg) {
  Collector errors(source_name);
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, msg))
    return invalid_argument(errors.first().empty() ? source_name + ": not a valid config"
                                                   : errors.first());
  return ok_status();
}

Status load_text_file(const std::string& path, Message* msg) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    return invalid_argument(
        path + ": is a directory, not a config file (give a .pbtxt file, e.g. configs/tiny.pbtxt)");
  std::ifstream in(path);
  if (!in)
    return not_found(path + ": cannot open the config file (does it exist and is it readable?)");
  std::stringstream buf;
  buf << in.rdbuf();
  return parse_text(buf.str(), path, msg);
}

Status check_finite_numbers(const Message& msg, const std::string& source,
                            const std::string& prefix) {
  const Reflection* r = msg.GetReflection();
  std::vector<const FieldDescriptor*> fields;
  r->ListFields(msg, &fields);
  for (const FieldDescriptor* f : fields) {
    const std::string path = prefix.empty() ? f->name() : prefix + "." + f->name();
    const int n = f->is_repeated() ? r->FieldSize(msg, f) : 1;
    for (int k = 0; k < n; ++k) {
      const std::string at = f->is_repeated() ? path + "[" + std::to_string(k) + "]" : path;
      double v = 0;
      switch (f->cpp_type()) {
        case FieldDescriptor::CPPTYPE_MESSAGE:
          HYDRA_RETURN_IF_ERROR(check_finite_numbers(
              f->is_repeated() ? r->GetRepeatedMessage(msg, f, k) : r->GetMessage(msg, f), source,
              at));
          continue;
        case FieldDescriptor::CPPTYPE_DOUBLE:
          v = f->is_repeated() ? r->GetRepeatedDouble(msg, f, k) : r->GetDouble(msg, f);
          break;
        case FieldDescriptor::CPPTYPE_FLOAT:
          v = f->is_repeated() ? r->GetRepeatedFloat(msg, f, k) : r->GetFloat(msg, f);
          break;
        default:
          continue;
      }
      if (!std::isfinite(v)) {
        std::ostringstream os;
        os << source << ": " << at << " = " << v << " must be a finite number";
        return invalid_argument(os.str());
      }
    }
  }
  return ok_status();
}

Expected<RunConfig> load_run_config(const std::string& path) {
  RunConfig cfg;
  HYDRA_RETURN_IF_ERROR(load_text_file(path, &cfg));
  std::vector<const FieldDescriptor*> fields;
  cfg.GetReflection()->ListFields(cfg, &fields);
  if (fields.empty())
    return invalid_argument(
        path +
        ": the config sets nothing (an empty file?); a config needs at least a model "
        "section: start from one of configs/*.pbtxt");
  return cfg;
}

void resolve_defaults(Message* msg) {
  const Descriptor* d = msg->GetDescriptor();
  const Reflection* r = msg->GetReflection();
  // moe.objective BLOCKFFN brings BlockFFN's values (spec/blockffn.md) for what the config leaves
  // unset: no balance loss, locality 2e-3, sparsification 5e-2, groups of 64 tokens.
  if (d == MoeConfig::descriptor()) {
    auto* moe = static_cast<MoeConfig*>(msg);
    if (moe->objective() == MoeConfig::BLOCKFFN) {
      if (!moe->has_balance_loss_weight()) moe->set_balance_loss_weight(0);
      if (!moe->has_locality_loss_weight()) moe->set_locality_loss_weight(2e-3);
      if (!moe->has_sparsity_coef_init()) moe->set_sparsity_coef_init(5e-2);
      if (!moe->has_sparsity_group() && moe->chunk() >= 1)
        moe->set_sparsity_group(std::max<int64_t>(1, 64 / moe->chunk()));
    }
  }
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    if (f->is_repeated()) {
      if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE)
        for (int k = 0; k < r->FieldSize(*msg, f); ++k)
          resolve_defaults(r->MutableRepeatedMessage(msg, f, k));
      continue;
    }
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_MESSAGE:
        resolve_defaults(r->MutableMessage(msg, f));
        break;
      case FieldDescriptor::CPPTYPE_INT32:
        if (!r->HasField(*msg, f)) r->SetInt32(msg, f, r->GetInt32(*msg, f));
        break;
      case FieldDescriptor::CPPTYPE_INT64:
        if (!r->HasField(*msg, f)) r->SetInt64(msg, f, r->GetInt64(*msg, f));
        break;
      case FieldDescriptor::CPPTYPE_UINT32:
        if (!r->HasField(*msg, f)) r->SetUInt32(msg, f, r->GetUInt32(*msg, f));
        break;
      case FieldDescriptor::CPPTYPE_UINT64:
        if (!r->HasField(*msg, f)) r->SetUInt64(msg, f, r->GetUInt64(*msg, f));
        break;
      case FieldDescriptor::CPPTYPE_DOUBLE:
        if (!r->HasField(*msg, f)) r->SetDouble(msg, f, r->GetDouble(*msg, f));
        break;
      case FieldDescriptor::CPPTYPE_FLOAT:
        if (!r->HasField(*msg, f)) r->SetFloat(msg, f, r->GetFloat(*msg, f));
        break;
      case FieldDescriptor::CPPTYPE_BOOL:
        if (!r->HasField(*msg, f)) r->SetBool(msg, f, r->GetBool(*msg, f));
        break;
      case FieldDescriptor::CPPTYPE_ENUM:
        if (!r->HasField(*msg, f)) r->SetEnum(msg, f, r->GetEnum(*msg, f));
        break;
      case FieldDescriptor::CPPTYPE_STRING:
        if (!r->HasField(*msg, f)) r->SetString(msg, f, r->GetString(*msg, f));
        break;
    }
  }
}

Status apply_overrides(Message* msg, const std::vector<std::string>& assignments) {
  for (const std::string& a : assignments) HYDRA_RETURN_IF_ERROR(apply_override(msg, a));
  return ok_status();
}

Status apply_override(Message* msg, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    return invalid_argument("--set " + assignment +
                            ": expected path=value, e.g. --set train.lr.lr=3e-4");
  const std::string path = trim(assignment.substr(0, eq)), value = assignment.substr(eq + 1);
  Message* cur = msg;
  std::string walked;
  std::stringstream ss(path);
  std::string part;
  std::vector<std::string> parts;
  while (std::getline(ss, part, '.')) parts.push_back(part);
  for (std::size_t i = 0; i < parts.size(); ++i) {
    const Descriptor* d = cur->GetDescriptor();
    const FieldDescriptor* f = d->FindFieldByName(parts[i]);
    const std::string here = walked.empty() ? parts[i] : walked + "." + parts[i];
    if (f == nullptr)
      return invalid_argument("--set " + path + ": unknown field '" + here + "'; " +
                              (walked.empty() ? std::string("the config") : walked) +
                              " has: " + field_list(d));
    const bool last = i + 1 == parts.size();
    if (!last) {
      if (f->cpp_type() != FieldDescriptor::CPPTYPE_MESSAGE || f->is_repeated())
        return invalid_argument("--set " + path + ": '" + here +
                                "' is not a message, it has no field '" + parts[i + 1] + "'");
      cur = cur->GetReflection()->MutableMessage(cur, f);
      walked = here;
      continue;
    }
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE && !f->is_repeated()) {
      Message* sub = cur->GetReflection()->MutableMessage(cur, f);
      sub->Clear();
      return parse_text(trim(value).size() >= 2 && trim(value).front() == '{'
                            ? trim(value).substr(1, trim(value).size() - 2)
                            : value,
                        "--set " + path, sub);
    }
    if (f->is_repeated()) {
      cur->GetReflection()->ClearField(cur, f);
      for (const std::string& item : split_list(value))
        HYDRA_RETURN_IF_ERROR(set_scalar(cur, f, item, path));
      return ok_status();
    }
    return set_scalar(cur, f, trim(value), path);
  }
  return invalid_argument("--set " + assignment + ": empty path");
}

std::string to_text(const Message& msg) {
  std::string out;
  google::protobuf::TextFormat::Printer printer;
  printer.PrintToString(msg, &out);
  return out;
}

Status write_text_file(const std::string& path, const Message& msg) {
  std::ofstream out(path);
  if (!out) return io_error(path + ": cannot write");
  out << to_text(msg);
  return out ? ok_status() : io_error(path + ": write failed");
}

}  // namespace hydra::config
