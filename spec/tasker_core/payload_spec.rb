# frozen_string_literal: true

RSpec.describe TaskerCore::Payload do
  it "measures nesting depth, stopping past the cap" do
    nest = ->(n) { n.times.reduce({}) { |inner, _| { "k" => inner } } }
    expect(described_class.depth(42, cap: 5)).to eq(0)
    expect(described_class.depth({}, cap: 5)).to eq(1)
    expect(described_class.depth({ "a" => 1, "b" => "x" }, cap: 5)).to eq(1)
    expect(described_class.depth([1, "x", nil], cap: 5)).to eq(1)
    expect(described_class.depth({ "a" => 1 }, cap: 0)).to eq(1) # past a cap of 0: cap + 1
    expect(described_class.depth([[]], cap: 5)).to eq(2)
    expect(described_class.depth({ "a" => [1, { "b" => [] }], "c" => 1 }, cap: 5)).to eq(4)
    expect(described_class.depth({ { "key" => [] } => 1 }, cap: 5)).to eq(3) # a map key nests too
    expect(described_class.depth(nest.call(9), cap: 20)).to eq(10)
    expect(described_class.depth(nest.call(9), cap: 4)).to eq(5)
    cyclic = []
    cyclic << cyclic
    expect(described_class.depth(cyclic, cap: 24)).to eq(25)
  end
end
