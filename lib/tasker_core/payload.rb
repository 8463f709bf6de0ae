# frozen_string_literal: true

module TaskerCore
  # The size and depth limits on payloads, checked where a payload enters
  # (create_task for contexts, template loading for handler_configs), so
  # that nothing is accepted that no worker could decode.
  module Payload
    module_function

    # How deep maps and arrays nest in value: 0 for a scalar, 1 for {} or
    # [], 2 for { "a" => [] }. Walks without recursion and stops descending
    # past cap levels (so a cyclic or absurdly deep value ends): cap + 1 then.
    def depth(value, cap: Codec::MAX_DEPTH)
      return 0 unless value.is_a?(Hash) || value.is_a?(Array)
      # The common case (a map or array of scalars) allocates nothing.
      return cap < 1 ? cap + 1 : 1 if flat?(value)

      deepest = 0
      stack = [value, 1]
      until stack.empty?
        level = stack.pop
        node = stack.pop
        deepest = level if level > deepest
        return cap + 1 if level > cap

        if node.is_a?(Hash)
          node.each_pair do |k, v|
            stack << k << level + 1 if k.is_a?(Hash) || k.is_a?(Array)
            stack << v << level + 1 if v.is_a?(Hash) || v.is_a?(Array)
          end
        else
          node.each { |c| stack << c << level + 1 if c.is_a?(Hash) || c.is_a?(Array) }
        end
      end
      deepest
    end

    # True when the map or array holds no map or array (as a key or value).
    def flat?(value)
      if value.is_a?(Hash)
        value.each_pair { |k, v| return false if k.is_a?(Hash) || k.is_a?(Array) || v.is_a?(Hash) || v.is_a?(Array) }
      else
        value.each { |c| return false if c.is_a?(Hash) || c.is_a?(Array) }
      end
      true
    end

    # PayloadTooDeepError naming what, its depth and the limit
    # (zeromq.max_payload_depth unless given).
    def check_depth!(value, what:, limit: TaskerCore.config.zeromq["max_payload_depth"])
      levels = depth(value)
      return value if levels <= limit

      shown = levels > Codec::MAX_DEPTH ? "more than #{Codec::MAX_DEPTH}" : levels.to_s
      raise PayloadTooDeepError, "#{what} nests #{shown} levels of maps and arrays, over " \
                                 "zeromq.max_payload_depth #{limit}"
    end

    # PayloadTooLargeError naming what, its packed size and the limit
    # (zeromq.max_context_bytes unless given). Returns packed.
    def check_size!(packed, what:, limit: TaskerCore.config.zeromq["max_context_bytes"])
      return packed if packed.bytesize <= limit

      raise PayloadTooLargeError, "#{what} is #{packed.bytesize} bytes packed, over zeromq.max_context_bytes #{limit}"
    end

    # check_depth!, pack, check_size!: the packed bytes.
    def pack_checked(value, what:)
      check_depth!(value, what: what)
      check_size!(Codec.pack(value), what: what)
    end
  end
end
