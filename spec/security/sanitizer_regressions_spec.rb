# frozen_string_literal: true

# Findings of rake spec:asan (the C extension built with ASan+UBSan), kept
# as regressions. They pass on the normal build too; under spec:asan UBSan
# halts the run if the undefined behaviour comes back.
RSpec.describe "sanitizer findings" do
  if ENV["TASKER_CORE_EXT_DIR"]
    it "runs against the extension in TASKER_CORE_EXT_DIR" do
      loaded = $LOADED_FEATURES.grep(%r{/tasker_core_ext\.so\z})
      expect(loaded).to eq([File.join(ENV["TASKER_CORE_EXT_DIR"], "tasker_core", "tasker_core_ext.so")])
    end
  end

  # msgpack-c passes an empty string as (NULL, 0), and the hash key cache
  # gave that NULL to memcmp (UBSan: "null pointer passed as argument 2").
  it "decodes maps with empty string and binary keys" do
    empty_str_key = "\x81\xA0\x01".b # {"" => 1}
    empty_bin_key = "\x81\xC4\x00\x02".b # {"".b => 2}
    2.times do # the second pass goes through the key cache
      expect(TaskerCore::Codec.unpack(empty_str_key)).to eq("" => 1)
      expect(TaskerCore::Codec.unpack(empty_bin_key)).to eq("".b => 2)
      expect(TaskerCore::Codec.unpack(empty_str_key, symbolize_keys: true)).to eq("": 1)
    end
    expect(TaskerCore::Codec.unpack(TaskerCore::Codec.pack({ "" => { "" => [""] } }))).to eq("" => { "" => [""] })
  end
end
