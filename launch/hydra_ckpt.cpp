// hydra-ckpt: a checkpoint without training. inspect (step, stage, layout, config, every tensor
// with its shape, dtype, files and checksums), verify (read every record, check every checksum and
// that the records cover each tensor exactly once), export (the model's parameters, whole, as one
// safetensors file that other tools read).
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "configs/config_io.h"
#include "launch/cli.h"
#include "trainer/checkpoint.h"
#include "trainer/curriculum.h"

using namespace hydra;
namespace fs = std::filesystem;
namespace po = cli::po;

namespace {

constexpr const char* kUsage =
    "hydra-ckpt inspect|verify|export CHECKPOINT|RUN_DIR [options]\n\n"
    "  inspect  step, stage, parallel layout, tokens seen, who wrote it, and each tensor's name,\n"
    "           dtype, shape and records (file, slice, CRC32C); --config prints the stored "
    "config,\n"
    "           --json FILE ('-': stdout) writes it all as JSON\n"
    "  verify   reads every record of every rank file and checks its size and CRC32C, and that\n"
    "           the records cover each tensor exactly once; exit 0 when all hold, 1 naming each\n"
    "           damaged tensor and file otherwise\n"
    "  export   writes the model's parameters (no optimizer state), each whole, to --out FILE in\n"
    "           the safetensors format (https://github.com/huggingface/safetensors), with the\n"
    "           run's config and step in its metadata; --dtype f32 (default), bf16 or f64\n\n"
    "CHECKPOINT is a checkpoints/step-N directory; a RUN_DIR stands for its newest complete one.\n"
    "Nothing is written into the checkpoint or the run.\n\nOptions";

std::string json_ints(const Shape& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string mib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f MiB", bytes / (1024.0 * 1024.0));
  return buf;
}

// The checkpoint `target` names: itself, or a run directory's newest complete one.
Expected<std::string> resolve(const std::string& target) {
  HYDRA_ASSIGN_OR_RETURN(const cli::RunTarget run, cli::resolve_run(target, ""));
  if (run.is_checkpoint) return target;
  return trainer::CheckpointManager(run.run_dir, 0).latest();
}

struct Loaded {
  std::string dir;
  config::CheckpointManifest man;
  std::vector<trainer::StoredTensor> tensors;
};

Expected<Loaded> load(const std::string& target) {
  Loaded l;
  HYDRA_ASSIGN_OR_RETURN(l.dir, resolve(target));
  HYDRA_ASSIGN_OR_RETURN(l.man, trainer::CheckpointManager::read_manifest(l.dir));
  HYDRA_ASSIGN_OR_RETURN(l.tensors, trainer::stored_tensors(l.man, l.dir));
  return l;
}

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (const int64_t d : s) n *= d;
  return n;
}

std::string kind_of(const std::string& name) { return name.substr(0, name.find('/')); }

int inspect(const cli::Tool& tool, const Loaded& l, const po::variables_map& vm) {
  const auto& m = l.man;
  if (vm.count("json")) {
    std::ostringstream os;
    os << "{\"checkpoint\": " << cli::json_string(l.dir)
       << ", \"format_version\": " << m.format_version() << ", \"step\": " << m.step()
       << ", \"stage\": " << m.stage() << ", \"tokens_seen\": " << m.tokens_seen()
       << ", \"elapsed_s\": " << m.elapsed_s() << ", \"world_size\": " << m.world_size()
       << ", \"dp\": " << m.dp() << ", \"ep\": " << m.ep() << ", \"sp\": " << m.sp()
       << ", \"written_by\": " << cli::json_string(m.written_by())
       << ", \"config\": " << cli::json_string(m.config_text()) << ", \"tensors\": [";
    for (std::size_t i = 0; i < l.tensors.size(); ++i) {
      const auto& t = l.tensors[i];
      os << (i ? ", " : "") << "{\"name\": " << cli::json_string(t.name)
         << ", \"dtype\": " << cli::json_string(std::string(dtype_name(t.dtype)))
         << ", \"shape\": " << json_ints(t.shape) << ", \"records\": [";
      for (std::size_t j = 0; j < t.records.size(); ++j) {
        const auto& r = *t.records[j];
        os << (j ? ", " : "") << "{\"file\": " << cli::json_string(r.file())
           << ", \"shape\": " << json_ints(Shape(r.shape().begin(), r.shape().end()))
           << ", \"offset\": " << json_ints(Shape(r.offset().begin(), r.offset().end()));
        if (r.has_flat_offset()) os << ", \"flat_offset\": " << r.flat_offset();
        os << ", \"crc32c\": " << r.crc32c() << "}";
      }
      os << "]}";
    }
    os << "]}";
    const int rc = cli::write_json(tool, vm, os.str());
    if (rc != cli::kOk || vm["json"].as<std::string>() == "-") return rc;
  }
  if (vm.count("config")) {
    std::cout << m.config_text();
    return cli::kOk;
  }
  std::map<std::string, std::pair<int64_t, double>> kinds;  // tensors, bytes
  std::map<std::string, bool> files;
  for (const auto& t : l.tensors) {
    auto& k = kinds[kind_of(t.name)];
    ++k.first;
    k.second += double(numel(t.shape)) * double(dtype_size(t.dtype));
    for (const auto* r : t.records) files[r->file()] = true;
  }
  std::printf("checkpoint %s\n", l.dir.c_str());
  std::printf("  step %ld, curriculum stage %ld, %.0f tokens seen, %.1f s of training\n",
              long(m.step()), long(m.stage()), m.tokens_seen(), m.elapsed_s());
  std::printf("  written by %s; format %ld\n", m.written_by().c_str(), long(m.format_version()));
  std::printf("  layout: %ld ranks (dp %ld, ep %ld, sp %ld), %zu rank files\n",
              long(m.world_size()), long(m.dp()), long(m.ep()), long(m.sp()), files.size());
  for (const auto& [kind, k] : kinds)
    std::printf("  %-8s %5ld tensors, %s\n", kind.c_str(), long(k.first), mib(k.second).c_str());
  std::printf("  %-44s %-5s %-18s %s\n", "tensor", "dtype", "shape", "records (file: crc32c)");
  for (const auto& t : l.tensors) {
    std::string recs;
    for (const auto* r : t.records) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%s%s: %08x", recs.empty() ? "" : ", ", r->file().c_str(),
                    r->crc32c());
      recs += buf;
    }
    std::printf("  %-44s %-5s %-18s %s\n", t.name.c_str(), std::string(dtype_name(t.dtype)).c_str(),
                shape_str(t.shape).c_str(), recs.c_str());
  }
  std::printf(
      "  (hydra-ckpt inspect --config prints the run's config; verify checks every byte)\n");
  return cli::kOk;
}

int verify(const Loaded& l) {
  config::RunConfig cfg;
  int damaged = 0;
  if (!config::parse_text(l.man.config_text(), l.dir + "/manifest.pb", &cfg).ok()) {
    std::cerr << "hydra-ckpt: " << l.dir << ": the config stored in manifest.pb cannot be parsed\n";
    ++damaged;
  }
  double bytes = 0;
  trainer::StoredTensorReader reader(l.dir);
  for (const auto& t : l.tensors) {
    auto got = reader.read(t);
    if (!got.ok()) {
      std::cerr << "hydra-ckpt: " << got.status().message() << "\n";
      ++damaged;
      continue;
    }
    bytes += double(got->nbytes());
  }
  if (damaged > 0) {
    std::cerr << "hydra-ckpt: " << l.dir << ": " << damaged << " of " << l.tensors.size()
              << " tensors damaged or missing; resume from another checkpoint (hydra-train "
                 "--resume CHECKPOINT)\n";
    return cli::kUserError;
  }
  std::printf("%s: step %ld, %zu tensors (%s), every checksum and every slice verified\n",
              l.dir.c_str(), long(l.man.step()), l.tensors.size(), mib(bytes).c_str());
  return cli::kOk;
}

// The resolved model (layer sizes, memory placements, patterns) and the paths the checkpoint's
// curriculum stage had on, as JSON for the safetensors metadata: what a reader in another framework
// needs to rebuild the forward without parsing our config format (bench/hydra_torch.py).
Expected<std::string> model_json(const config::CheckpointManifest& man, const std::string& dir) {
  config::RunConfig cfg;
  HYDRA_RETURN_IF_ERROR(config::parse_text(man.config_text(), dir + "/manifest.pb", &cfg));
  trainer::resolve_run_config(&cfg);
  HYDRA_ASSIGN_OR_RETURN(const model::ModelSpec s, model::make_spec(cfg.model(), dir));
  HYDRA_ASSIGN_OR_RETURN(const std::vector<trainer::Stage> stages,
                         trainer::resolve_stages(cfg, s, dir));
  const trainer::Stage& stage = trainer::stage_at(stages, std::max<int64_t>(man.step() - 1, 0));
  const auto ints = [](const std::vector<int64_t>& v) {
    std::string out = "[";
    for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
    return out + "]";
  };
  const auto flag = [](bool b) { return b ? "true" : "false"; };
  std::vector<int64_t> sga_blocks;
  for (int64_t b = 0; b < s.num_blocks; ++b)
    if (b < static_cast<int64_t>(s.has_sga.size()) && s.has_sga[b]) sga_blocks.push_back(b);
  const auto& moe = s.cfg.moe();
  std::ostringstream os;
  os.precision(17);
  os << "{\"kind\": \"" << (s.transformer ? "transformer" : "hydra") << "\", \"d\": " << s.d
     << ", \"num_blocks\": " << s.num_blocks << ", \"vocab\": " << s.vocab
     << ", \"max_seq_len\": " << s.max_seq_len << ", \"norm_eps\": " << s.norm_eps
     << ", \"rope_theta\": " << s.rope_theta << ", \"tf_heads\": " << s.tf_heads
     << ", \"ssm\": {\"form\": \"" << (s.ssd ? "SSD" : "SELECTIVE")
     << "\", \"d_inner\": " << s.d_inner << ", \"d_state\": " << s.d_state
     << ", \"conv_width\": " << s.conv_width << ", \"dt_rank\": " << s.dt_rank
     << ", \"heads\": " << s.ssm_heads << "}"
     << ", \"sga\": {\"blocks\": " << ints(sga_blocks) << ", \"heads\": " << s.sga_heads
     << ", \"window\": " << s.sga_window << ", \"global_stride\": " << s.sga_stride << "}"
     << ", \"moe\": {\"num_experts\": " << s.num_experts << ", \"max_active\": " << s.max_active
     << ", \"chunk\": " << s.moe_chunk << ", \"gated_experts\": " << flag(s.gated_experts)
     << ", \"shared_expert\": " << flag(s.shared_expert) << ", \"router_eps\": " << moe.router_eps()
     << ", \"router_input\": \"" << config::MoeConfig::RouterInput_Name(moe.router_input()) << "\"}"
     << ", \"workspace\": {\"after_block\": " << ints(s.ws_after) << ", \"slots\": " << s.ws_slots
     << ", \"chunk\": " << s.ws_chunk << ", \"heads\": " << s.ws_heads << ", \"dim\": " << s.ws_dim
     << ", \"write\": \"" << (s.ws_parallel_write ? "PARALLEL" : "SERIAL") << "\"}"
     << ", \"pkm\": {\"after_block\": " << ints(s.pkm_after) << ", \"heads\": " << s.pkm_heads
     << ", \"k_dim\": " << s.pkm_k_dim << ", \"n_keys\": " << s.pkm_n_keys
     << ", \"topk\": " << s.pkm_topk << "}, \"controller\": " << flag(s.cfg.block().controller())
     << ", \"paths\": {\"stage\": " << cli::json_string(stage.name)
     << ", \"ssm\": " << flag(stage.paths.ssm) << ", \"sga\": " << flag(stage.paths.sga)
     << ", \"moe_routing\": " << flag(stage.paths.moe_routing)
     << ", \"workspace\": " << flag(stage.paths.workspace) << ", \"pkm\": " << flag(stage.paths.pkm)
     << "}}";
  return os.str();
}

// safetensors: an 8-byte little-endian header length, the JSON header (names, dtypes, shapes,
// [begin, end) byte offsets into the data, and a string-to-string __metadata__), padded with
// spaces to a multiple of 8, then the tensors' bytes in the header's order.
int export_safetensors(const Loaded& l, const po::variables_map& vm) {
  if (!vm.count("out")) {
    std::cerr << "hydra-ckpt: export needs --out FILE (e.g. --out model.safetensors)\n";
    return cli::kUsageError;
  }
  const std::string out = vm["out"].as<std::string>();
  const std::string want = vm["dtype"].as<std::string>();
  const auto dtype = dtype_from_name(want);
  if (!dtype || !is_floating(*dtype)) {
    std::cerr << "hydra-ckpt: --dtype " << want << ": expected f32, bf16 or f64\n";
    return cli::kUsageError;
  }
  const char* st_name = *dtype == DType::kF32 ? "F32" : (*dtype == DType::kBF16 ? "BF16" : "F64");
  std::vector<std::pair<std::string, Tensor>> params;
  trainer::StoredTensorReader reader(l.dir);
  for (const auto& t : l.tensors) {
    if (kind_of(t.name) != "param") continue;
    auto got = reader.read(t);
    if (!got.ok()) {
      std::cerr << "hydra-ckpt: " << got.status().message() << "\n";
      return cli::kUserError;
    }
    params.emplace_back(t.name.substr(t.name.find('/') + 1), got->to(*dtype).contiguous());
  }
  if (params.empty()) {
    std::cerr << "hydra-ckpt: " << l.dir << " holds no parameters (no param/ tensors)\n";
    return cli::kUserError;
  }
  const auto model = model_json(l.man, l.dir);
  if (!model.ok()) {
    std::cerr << "hydra-ckpt: " << model.status().message() << "\n";
    return cli::kUserError;
  }
  std::ostringstream h;
  h << "{\"__metadata__\": {\"format\": \"pt\", \"hydra_step\": "
    << cli::json_string(std::to_string(l.man.step()))
    << ", \"hydra_checkpoint\": " << cli::json_string(l.dir)
    << ", \"hydra_config\": " << cli::json_string(l.man.config_text())
    << ", \"hydra_model\": " << cli::json_string(*model) << "}";
  int64_t offset = 0;
  for (const auto& [name, t] : params) {
    const int64_t n = t.nbytes();
    h << ", " << cli::json_string(name) << ": {\"dtype\": \"" << st_name
      << "\", \"shape\": " << json_ints(t.shape()) << ", \"data_offsets\": [" << offset << ", "
      << offset + n << "]}";
    offset += n;
  }
  h << "}";
  std::string header = h.str();
  header.append((8 - header.size() % 8) % 8, ' ');
  const std::string tmp = out + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    uint64_t len = header.size();
    unsigned char le[8];
    for (int i = 0; i < 8; ++i) le[i] = static_cast<unsigned char>(len >> (8 * i));
    f.write(reinterpret_cast<const char*>(le), 8);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const auto& [name, t] : params)  // little-endian hosts: the bytes as stored
      f.write(static_cast<const char*>(t.raw_data()), static_cast<std::streamsize>(t.nbytes()));
    f.flush();
    if (!f) {
      std::error_code ec;
      fs::remove(tmp, ec);
      std::cerr << "hydra-ckpt: cannot write " << out << " (disk full or not writable?)\n";
      return cli::kUserError;
    }
  }
  std::error_code ec;
  fs::rename(tmp, out, ec);
  if (ec) {
    std::cerr << "hydra-ckpt: cannot move " << tmp << " to " << out << ": " << ec.message() << "\n";
    return cli::kUserError;
  }
  std::printf("%s: %zu parameters (%s, %s) of step %ld from %s\n", out.c_str(), params.size(),
              want.c_str(), mib(double(offset)).c_str(), long(l.man.step()), l.dir.c_str());
  return cli::kOk;
}

int run(const cli::Tool& tool, int argc, char** argv) {
  po::options_description opts(kUsage);
  opts.add_options()("help,h", "show this help")(
      "json", po::value<std::string>(), "inspect: also write JSON to this file ('-': stdout only)")(
      "config", "inspect: print the config stored in the checkpoint")(
      "out", po::value<std::string>(), "export: the safetensors file to write")(
      "dtype", po::value<std::string>()->default_value("f32"), "export: f32, bf16 or f64");
  po::options_description hidden;
  hidden.add_options()("command", po::value<std::string>(), "inspect, verify or export")(
      "checkpoint", po::value<std::string>(), "checkpoint or run directory");
  po::positional_options_description pos;
  pos.add("command", 1).add("checkpoint", 1);
  po::variables_map vm;
  if (const auto done = tool.parse(argc, argv, opts, &vm, &hidden, &pos)) return *done;
  if (!vm.count("command") || !vm.count("checkpoint")) {
    tool.error("name a command and a checkpoint, e.g. hydra-ckpt inspect runs/toy (see --help)");
    return cli::kUsageError;
  }
  const std::string cmd = vm["command"].as<std::string>();
  if (cmd != "inspect" && cmd != "verify" && cmd != "export") {
    tool.error("unknown command '" + cmd + "': expected inspect, verify or export");
    return cli::kUsageError;
  }
  auto l = load(vm["checkpoint"].as<std::string>());
  if (!l.ok()) {
    tool.error(l.status().message());
    return cli::kUserError;
  }
  if (cmd == "inspect") return inspect(tool, *l, vm);
  if (cmd == "verify") return verify(*l);
  return export_safetensors(*l, vm);
}

}  // namespace

int main(int argc, char** argv) {
  const cli::Tool tool("hydra-ckpt", &argc, &argv);
  return tool.guarded([&] { return run(tool, argc, argv); });
}
