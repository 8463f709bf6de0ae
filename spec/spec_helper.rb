# frozen_string_literal: true

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
# rake spec:asan points this at its ASan+UBSan build of the extension.
$LOAD_PATH.unshift ENV["TASKER_CORE_EXT_DIR"] if ENV["TASKER_CORE_EXT_DIR"]
require "tasker_core"
require "socket"
require "timeout"

Dir[File.join(__dir__, "support", "**", "*.rb")].sort.each { |f| require f }

RSpec.configure do |config|
  config.disable_monkey_patching!
  config.expect_with(:rspec) { |c| c.syntax = :expect }
  config.order = :random
  Kernel.srand config.seed

  # TASKER_CORE_GC_STRESS=1 (rake spec:gc_stress) runs each example under
  # GC.stress, which collects at every allocation: it finds objects the C
  # extension holds without marking them, and missing write barriers. By
  # default each of those collections is a minor one (GC.stress = 0x01), which
  # frees every unmarked young object, the objects a missing mark loses;
  # TASKER_CORE_GC_STRESS_MODE=full makes them full collections, about twenty
  # times slower.
  if ENV["TASKER_CORE_GC_STRESS"] == "1"
    config.around do |example|
      GC.stress = ENV.fetch("TASKER_CORE_GC_STRESS_MODE", "minor") == "full" ? true : 0x01
      example.run
    ensure
      GC.stress = false
    end
  end

  config.include SpecHelpers
end
