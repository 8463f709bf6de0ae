# frozen_string_literal: true

# Inputs the fuzzers (fuzz/, rake fuzz) found, kept as regressions.
RSpec.describe "fuzzer findings" do
  # protocol_fuzz: a map32 header declaring 4,294,967,295 entries made
  # msgpack-c's msgpack_unpack_next ask for 64 GiB before reading further.
  # Now tc_codec_check refuses counts the input cannot hold first.
  HUGE_MAP = "\x82\xB0protocol_version\x01\xA4type\xDF\xFF\xFF\xFF\xFF".b

  it "refuses a map header declaring more entries than the input holds (codec)" do
    expect { TaskerCore::Codec.unpack(HUGE_MAP) }.to raise_error(TaskerCore::ProtocolError, /declares/)
  end

  it "counts a result body with an impossible container count as undecodable and keeps serving" do
    handle = TaskerCore::OrchestrationHandle.new(batch_endpoint: "tcp://127.0.0.1:*", result_endpoint: "tcp://127.0.0.1:*")
    pub = TaskerCore::Socket::Publisher.new(connect: handle.zeromq_config["result_endpoint"])
    wait_until(message: "the handle's subscription") do
      handle.receive_results(timeout_ms: 10)
      pub.subscriptions(timeout_ms: 10).any?
    end
    pub.send_parts(["partial_result", HUGE_MAP])
    pub.send_parts(["partial_result", "\xDD\xFF\xFF\xFF\xFF".b]) # array32 of 4 G items
    wait_until(message: "both counted") do
      handle.receive_results(timeout_ms: 10)
      handle.stats[:bad_messages][:undecodable_body] >= 2
    end
    expect(handle.stats[:bad_messages][:undecodable_body]).to eq(2)
  ensure
    pub&.close
    handle&.close
  end
end
