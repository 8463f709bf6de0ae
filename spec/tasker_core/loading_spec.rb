# frozen_string_literal: true

RSpec.describe TaskerCore do
  it "loads its C extension" do
    expect($LOADED_FEATURES.grep(%r{tasker_core/tasker_core_ext})).not_to be_empty
  end

  it "roots every error class at TaskerCore::Error" do
    %i[ConfigurationError ProtocolError ConnectionError NoWorkersError StoreError].each do |name|
      expect(TaskerCore.const_get(name).ancestors).to include(TaskerCore::Error)
    end
  end
end
