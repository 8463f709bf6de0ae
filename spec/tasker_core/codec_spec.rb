# frozen_string_literal: true

require "msgpack" # development dependency: an independent msgpack peer

RSpec.describe TaskerCore::Codec do
  subject(:codec) { described_class }

  def stress?
    ENV["TASKER_CORE_GC_STRESS"] == "1"
  end

  def round_trip(obj, **opts)
    codec.unpack(codec.pack(obj), **opts)
  end

  def bytes(*values)
    values.pack("C*")
  end

  def gem_factory
    factory = MessagePack::Factory.new
    factory.register_type(-1, Time, packer: MessagePack::Time::Packer, unpacker: MessagePack::Time::Unpacker)
    factory
  end

  def step(i)
    { "step_id" => 123 + i, "task_id" => 45, "step_name" => "charge_payment", "handler" => "Payments::ChargeHandler",
      "attempt" => 1, "timeout_ms" => 30_000,
      "context" => { "order_id" => 991, "amount" => "19.99", "currency" => "EUR" },
      "dependency_results" => { "validate" => { "ok" => true } } }
  end

  def nested(depth)
    depth.times.reduce(1) { |inner, _| [inner] }
  end

  it "exposes MAX_DEPTH" do
    expect(codec::MAX_DEPTH).to eq(32)
  end

  describe ".pack / .unpack round trips" do
    it "returns a binary String" do
      expect(codec.pack("x").encoding).to eq(Encoding::ASCII_8BIT)
    end

    it "round-trips nil, true and false" do
      [nil, true, false].each { |v| expect(round_trip(v)).to equal(v) }
    end

    it "round-trips integers across the int64 and uint64 boundaries" do
      ints = [0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1,
              -1, -32, -33, -128, -129, -2**15, -2**15 - 1, -2**31, -2**31 - 1, -2**62 - 1, -2**63 + 1, -2**63]
      ints.each { |i| expect(round_trip(i)).to eq(i), "for #{i}" }
    end

    it "raises RangeError outside -2**63 .. 2**64-1" do
      expect { codec.pack(2**64) }.to raise_error(RangeError, /outside msgpack's range/)
      expect { codec.pack(-2**63 - 1) }.to raise_error(RangeError)
      expect { codec.pack([1, { "a" => 2**70 }]) }.to raise_error(RangeError)
    end

    it "round-trips floats including NaN, infinities and -0.0" do
      [0.0, 1.5, -2.25, Float::MAX, Float::MIN, Float::EPSILON, Float::INFINITY, -Float::INFINITY].each do |f|
        expect(round_trip(f)).to eq(f)
      end
      expect(round_trip(Float::NAN)).to be_nan
      expect(1.0 / round_trip(-0.0)).to eq(-Float::INFINITY)
      expect(codec.pack(1e300).bytesize).to eq(9) # always float 64
    end

    it "round-trips empty, short and large strings as UTF-8" do
      ["", "a", "é日本", "x" * 31, "x" * 32, "y" * 255, "z" * 65_536, "w" * (stress? ? 70_000 : 1_000_000)].each do |s|
        out = round_trip(s)
        expect(out).to eq(s)
        expect(out.encoding).to eq(Encoding::UTF_8)
      end
    end

    it "packs binary strings as bin and gives them back as ASCII-8BIT" do
      bin = "\x00\xff\xfe".b
      packed = codec.pack(bin)
      expect(packed.getbyte(0)).to eq(0xc4) # bin 8
      out = codec.unpack(packed)
      expect(out).to eq(bin)
      expect(out.encoding).to eq(Encoding::ASCII_8BIT)
      expect(round_trip("".b).encoding).to eq(Encoding::ASCII_8BIT)
    end

    it "packs US-ASCII as str, unpacking as UTF-8" do
      s = "plain".encode("US-ASCII")
      expect(codec.pack(s).getbyte(0)).to eq(0xa5)
      expect(round_trip(s).encoding).to eq(Encoding::UTF_8)
    end

    it "transcodes other encodings to UTF-8 and packs them as str" do
      latin1 = "café".encode("ISO-8859-1")
      expect(codec.pack(latin1)).to eq(codec.pack("café"))
      sjis = "日本".encode("Shift_JIS")
      expect(round_trip(sjis)).to eq("日本")
      utf16 = "hi".encode("UTF-16LE")
      expect(round_trip(utf16)).to eq("hi")
    end

    it "raises the Encoding error for a string that cannot be transcoded" do
      broken = "\xff\xfe".dup.force_encoding("EUC-JP")
      expect { codec.pack(["ok", broken]) }.to raise_error(EncodingError)
    end

    it "packs symbols as str" do
      expect(codec.pack(:step_id)).to eq(codec.pack("step_id"))
      expect(round_trip(:ok)).to eq("ok")
      expect(round_trip(:"dynamic_#{rand(1000)}")).to start_with("dynamic_")
    end

    it "round-trips arrays and hashes, empty and nested" do
      obj = { "a" => [], "b" => {}, "c" => [1, [2, [3, { "d" => nil }]]], 7 => "int key", -3 => 1.5,
              "steps" => Array.new(20) { |i| step(i) } }
      expect(round_trip(obj)).to eq(obj)
    end

    it "round-trips large arrays and maps" do
      n = stress? ? 2_000 : 100_000
      arr = Array.new(n) { |i| i }
      expect(round_trip(arr)).to eq(arr)
      h = (0...n).to_h { |i| ["k#{i}", i] }
      expect(round_trip(h)).to eq(h)
    end

    it "packs Time as the timestamp extension and unpacks a UTC Time, nanoseconds preserved" do
      times = [Time.at(0), Time.at(1_700_000_000), Time.at(1_700_000_000, 123_456_789, :nsec),
               Time.at(2**34, 1, :nsec), Time.at(-1, 500, :nsec), Time.at(-2**40, 999_999_999, :nsec),
               Time.new(2024, 2, 29, 12, 0, 0.25r, "+05:30")]
      times.each do |t|
        out = round_trip(t)
        expect(out).to eq(t)
        expect(out.nsec).to eq(t.nsec)
        expect(out).to be_utc
      end
      expect(codec.pack(Time.at(1)).bytes.first(2)).to eq([0xd6, 0xff])                      # timestamp 32
      expect(codec.pack(Time.at(1, 1, :nsec)).bytes.first(2)).to eq([0xd7, 0xff])             # timestamp 64
      expect(codec.pack(Time.at(-1)).bytes.first(3)).to eq([0xc7, 12, 0xff])                  # timestamp 96
    end

    it "symbolizes str and bin keys with symbolize_keys: true and leaves int keys alone" do
      packed = codec.pack({ "a" => { "b" => 1 }, 5 => 2, "c".b => 3 })
      expect(codec.unpack(packed, symbolize_keys: true)).to eq({ a: { b: 1 }, 5 => 2, c: 3 })
      expect(codec.unpack(packed, symbolize_keys: false)).to eq({ "a" => { "b" => 1 }, 5 => 2, "c" => 3 })
    end

    it "gives frozen, deduplicated hash keys and mutable values" do
      one = codec.unpack(codec.pack({ "step_id" => "v" }))
      two = codec.unpack(codec.pack({ "step_id" => "v" }))
      expect(one.keys.first).to be_frozen
      expect(one.keys.first).to equal(two.keys.first)
      expect(one["step_id"]).not_to be_frozen
    end

    it "keeps the last value of a duplicated key" do
      expect(codec.unpack(bytes(0x82, 0xa1, 0x61, 0x01, 0xa1, 0x61, 0x02))).to eq({ "a" => 2 })
    end

    it "packs shared (non-cyclic) references" do
      shared = [1, 2]
      expect(round_trip([shared, { "x" => shared }])).to eq([[1, 2], { "x" => [1, 2] }])
    end

    it "packs and unpacks exactly MAX_DEPTH levels of nesting" do
      obj = nested(32)
      expect(round_trip(obj)).to eq(obj)
    end
  end

  describe "unsupported objects" do
    it "raises TypeError naming the class" do
      [Object.new, 1r, 2i, (1..2), Struct.new(:a).new(1), Class.new, -> {}].each do |obj|
        expect { codec.pack(obj) }.to raise_error(TypeError, /#{Regexp.escape(obj.class.to_s)}/)
      end
      expect { codec.pack({ "a" => [1, Object.new] }) }.to raise_error(TypeError, /Object/)
    end

    it "refuses hash keys other than String, Symbol and Integer" do
      [nil, 1.5, [1], {}, true].each do |key|
        expect { codec.pack({ key => 1 }) }.to raise_error(TypeError, /Hash key of class #{key.class}/)
      end
    end

    it "raises ArgumentError on cyclic arrays and hashes instead of hanging" do
      a = [1]
      a << a
      expect { codec.pack(a) }.to raise_error(ArgumentError, /cyclic/)
      h = { "x" => 1 }
      h["self"] = h
      expect { codec.pack(h) }.to raise_error(ArgumentError, /cyclic/)
      deep = { "l" => [] }
      deep["l"] << { "back" => deep }
      expect { codec.pack(deep) }.to raise_error(ArgumentError, /cyclic/)
    end

    it "raises ArgumentError past MAX_DEPTH" do
      expect { codec.pack(nested(33)) }.to raise_error(ArgumentError, /deeper than 32/)
      expect { codec.pack(33.times.reduce({}) { |inner, _| { "k" => inner } }) }.to raise_error(ArgumentError)
    end

    it "keeps working after raising halfway through a large object" do
      big = Array.new(stress? ? 200 : 10_000) { |i| step(i) } + [Object.new]
      3.times { expect { codec.pack(big) }.to raise_error(TypeError) }
      expect(codec.unpack(codec.pack([step(1)]))).to eq([step(1)])
    end

    it "requires a String to unpack" do
      expect { codec.unpack(nil) }.to raise_error(TypeError)
      expect { codec.unpack("\x01", bogus: 1) }.to raise_error(ArgumentError)
    end
  end

  describe "bad input" do
    def expect_protocol_error(input, message = nil)
      expectation = expect { codec.unpack(input.b) }
      message ? expectation.to(raise_error(TaskerCore::ProtocolError, message)) : expectation.to(raise_error(TaskerCore::ProtocolError))
    end

    it "raises a TaskerCore::Error subclass" do
      expect(TaskerCore::ProtocolError.ancestors).to include(TaskerCore::Error)
    end

    it "refuses empty input" do
      expect_protocol_error("", /empty/)
    end

    it "refuses the reserved byte 0xc1, naming the offset" do
      expect_protocol_error(bytes(0xc1), /invalid byte 0xc1 at byte 0/)
      expect_protocol_error(bytes(0x92, 0x01, 0xc1), /invalid byte 0xc1 at byte 2/)
    end

    it "refuses a declared length past the end of the buffer" do
      expect_protocol_error(bytes(0xdb, 0xff, 0xff, 0xff, 0xff), /str at byte 5 declares 4294967295 bytes but only 0 remain/)
      expect_protocol_error(bytes(0xc6, 0x00, 0x00, 0x01, 0x00, 0x41), /bin at byte 5 declares 256 bytes but only 1 remain/)
      expect_protocol_error(bytes(0xa5, 0x61), /str at byte 1 declares 5 bytes/)
      expect_protocol_error(bytes(0xc9, 0xff, 0xff, 0xff, 0xf0, 0xff), /ext at byte 5/)
    end

    it "refuses container counts the input cannot hold, without allocating for them" do
      expect_protocol_error(bytes(0xdd, 0xff, 0xff, 0xff, 0xff), /declares 4294967295 items/)
      expect_protocol_error(bytes(0xdf, 0xff, 0xff, 0xff, 0xff), /declares 4294967295 items/)
    end

    it "refuses truncated input" do
      expect_protocol_error(bytes(0x92, 0x01), /truncated.*array/)
      expect_protocol_error(bytes(0x82, 0xa1, 0x61, 0x01), /truncated.*map/)
      expect_protocol_error(bytes(0xcd, 0x01), /truncated input: int header cut off/)
      expect_protocol_error(bytes(0xcb, 0x00, 0x00), /truncated/)
      expect_protocol_error(bytes(0xdb, 0x00), /truncated input: str length/)
    end

    it "refuses trailing bytes" do
      expect_protocol_error(bytes(0x01, 0x02), /trailing bytes: the value ends at byte 1 of 2/)
      expect_protocol_error(codec.pack({ "a" => 1 }) + "\x00", /trailing/)
    end

    it "refuses nesting past MAX_DEPTH" do
      expect(codec.unpack(bytes(*([0x91] * 32), 0x01))).to eq(nested(32))
      expect_protocol_error(bytes(*([0x91] * 33), 0x01), /nesting deeper than 32 .* at byte 32/)
      expect_protocol_error(bytes(*([0x91] * 32), 0x90), /nesting deeper than 32/) # even an empty 33rd level
      expect_protocol_error(bytes(*([0x81, 0xa1, 0x6b] * 33), 0xc0), /nesting deeper/)
    end

    it "refuses map keys other than str, bin and int" do
      expect_protocol_error(bytes(0x81, 0x90, 0x01), /unsupported map key type array/)
      expect_protocol_error(bytes(0x81, 0xc0, 0x01), /unsupported map key type nil/)
      expect_protocol_error(bytes(0x81, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x01), /unsupported map key type float/)
      expect_protocol_error(bytes(0x81, 0x80, 0x01), /map key type map/)
      expect_protocol_error(bytes(0x81, 0xc3, 0x01), /map key type bool/)
    end

    it "refuses unknown ext types and malformed timestamps" do
      expect_protocol_error(bytes(0xd4, 0x05, 0x00), /unknown ext type 5 at byte 1/)
      expect_protocol_error(bytes(0x92, 0x01, 0xc7, 0x02, 0x7f, 0x00, 0x00), /unknown ext type 127 at byte 4/)
      expect_protocol_error(bytes(0xd5, 0xff, 0x00, 0x00), /malformed timestamp/)
      # timestamp 64 with nanoseconds 0x3fffffff > 999_999_999
      expect_protocol_error(bytes(0xd7, 0xff, 0xff, 0xff, 0xff, 0xfc, 0, 0, 0, 0), /malformed timestamp/)
      # timestamp 96 with nanoseconds 1e9
      expect_protocol_error(bytes(0xc7, 12, 0xff, 0x3b, 0x9a, 0xca, 0x00, 0, 0, 0, 0, 0, 0, 0, 0), /nanoseconds/)
    end

    it "only ever raises ProtocolError on truncations and random byte flips of valid messages" do
      rng = Random.new(RSpec.configuration.seed)
      messages = [
        codec.pack({ "protocol_version" => 1, "type" => "batch", "steps" => [step(1), step(2)] }),
        codec.pack([nil, true, false, -1, 2**64 - 1, -2**63, 1.5, "é", "\xff".b, Time.at(1, 5, :nsec), { 1 => [] }]),
        codec.pack(nested(30))
      ]
      flips = stress? ? 20 : 3_000
      outcomes = Hash.new(0)
      messages.each do |msg|
        (0...msg.bytesize).each do |cut|
          expect { codec.unpack(msg.byteslice(0, cut)) }.to raise_error(TaskerCore::ProtocolError)
        end
        flips.times do
          mutated = msg.dup
          rng.rand(1..4).times { mutated.setbyte(rng.rand(mutated.bytesize), rng.rand(256)) }
          begin
            codec.unpack(mutated)
            outcomes[:value] += 1
          rescue TaskerCore::ProtocolError
            outcomes[:protocol_error] += 1
          end
        end
      end
      expect(outcomes.values.sum).to eq(flips * messages.size)
      expect(outcomes[:protocol_error]).to be > 0
    end

    it "survives random garbage" do
      rng = Random.new(RSpec.configuration.seed)
      (stress? ? 20 : 5_000).times do
        garbage = rng.bytes(rng.rand(1..64))
        begin
          codec.unpack(garbage)
        rescue TaskerCore::ProtocolError => e
          expect(e.message).to start_with("msgpack: ")
        end
      end
    end
  end

  describe "interop with the msgpack gem" do
    let(:sample) do
      { "protocol_version" => 1, "type" => "partial_result", "ints" => [0, 127, 128, -32, -33, 2**32, 2**64 - 1, -2**63],
        "float" => 0.1, "nil" => nil, "flags" => [true, false], "text" => "héllo", "bin" => "\x00\x01".b,
        "empty" => { "a" => [], "h" => {} }, 42 => "int key", "long" => "l" * 300, "steps" => [step(1), step(2)] }
    end

    it "writes the same bytes as the gem" do
      expect(codec.pack(sample)).to eq(MessagePack.pack(sample))
      expect(codec.pack(:sym)).to eq(MessagePack.pack(:sym))
    end

    it "reads what the gem writes" do
      expect(codec.unpack(MessagePack.pack(sample))).to eq(sample)
      expect(codec.unpack(MessagePack.pack(sample), symbolize_keys: true))
        .to eq(MessagePack.unpack(MessagePack.pack(sample), symbolize_keys: true))
    end

    it "writes what the gem reads, keeping encodings" do
      out = MessagePack.unpack(codec.pack(sample))
      expect(out).to eq(sample)
      expect(out["text"].encoding).to eq(Encoding::UTF_8)
      expect(out["bin"].encoding).to eq(Encoding::ASCII_8BIT)
    end

    it "exchanges timestamps with the gem's Time extension both ways" do
      factory = gem_factory
      [Time.at(0), Time.at(1_700_000_000, 123_456_789, :nsec), Time.at(2**35, 7, :nsec), Time.at(-5, 3, :nsec)].each do |t|
        expect(factory.load(codec.pack(t))).to eq(t)
        expect(codec.unpack(factory.dump(t))).to eq(t)
        expect(codec.pack(t)).to eq(factory.dump(t))
      end
    end

    it "reads the gem's float 32 and non-minimal integer encodings" do
      expect(codec.unpack(bytes(0xca, 0x3f, 0xc0, 0x00, 0x00))).to eq(1.5)
      expect(codec.unpack(bytes(0xcf, 0, 0, 0, 0, 0, 0, 0, 5))).to eq(5)
      expect(codec.unpack(bytes(0xd0, 0xff))).to eq(-1)
      expect(codec.unpack(bytes(0xda, 0x00, 0x01, 0x41))).to eq("A")
    end
  end
end
